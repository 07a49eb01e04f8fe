"""timecma.export: turn a trained checkpoint into a deployable bundle (ONNX graphs, engines)."""
