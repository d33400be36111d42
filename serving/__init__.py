"""Small serving of exported students: ONNX export (fp32 and dynamically quantized INT8) and onnxruntime sessions.

See `python -m serving.export_onnx --help` and benchmarks/serving.py.
"""
