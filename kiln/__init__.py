"""kiln: Hugging Face checkpoint -> validated, versioned TensorRT-LLM / torch engines per GPU target."""

__version__ = "0.1.0"
