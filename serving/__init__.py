"""Small serving of exported students and fine-tuned classifiers: ONNX export (fp32 and dynamic INT8) and sessions.

See `python -m serving.export_onnx --help` and benchmarks/serving.py.
"""
