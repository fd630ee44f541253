"""The BitFit study: full fine-tuning, BitFit and its ablations, Frozen, on GLUE.

``config.py`` (one GPU) and ``config_cpu.py`` (a 2-core CPU) hold the grid and the training options;
``study.py`` the grid, its runs and each run's settings; ``driver.py`` runs them; ``records.py``
says whether a finished run still matches the study; ``tables.py`` builds the tables from the
results files; ``bias_change.py`` measures which biases moved. ``run.py`` and
``analyze_bias_change.py`` are the command lines.
"""
