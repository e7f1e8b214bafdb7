"""Export: the decoder in formats other runtimes load — ONNX (+ the ONNX Runtime backend), TorchScript,
TFLite/LiteRT, and TensorRT engines built from the ONNX file. Each format lives in its own module and is imported
on demand, so its optional packages are needed only when it is used."""
