"""The BitFit study: full fine-tuning, BitFit and its ablations, Frozen, on GLUE.

``config.py`` (one GPU) and ``config_cpu.py`` (a 2-core CPU) hold the grid and the training options;
``bias_change.py`` measures which biases moved (command line: ``analyze_bias_change.py``).
"""
