"""Tasks: what is read, the head, the loss, the metrics and the output of each task kind."""
