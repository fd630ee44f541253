"""Generic data plumbing: tokenizing, encoded splits, length-bucketed and packed batches."""
