"""The training data pipeline: finding and loading images, captions and prompts, aspect buckets, epoch batches."""
