"""imagepipe's shared package: shipped to both Lambda functions as a layer, imported as-is locally."""

__version__ = "0.1.0"
