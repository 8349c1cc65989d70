"""kiln: Hugging Face checkpoint -> validated, versioned TensorRT-LLM / torch engines per GPU target."""

__version__ = "0.1.0"

from kiln import redact as _redact  # noqa: E402

_redact.install()  # secrets never reach any log record, whoever logs it
