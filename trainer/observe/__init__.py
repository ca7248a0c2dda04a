"""What a run shows: LBANN's lines, progress bars, TensorBoard, metrics.jsonl and the report of
runs. Imports nothing of the loop (tests/test_imports.py)."""
