"""Building an artifact: checkpoint -> ONNX export -> registered passes -> backend files, driven by a target profile (``convert``)."""
