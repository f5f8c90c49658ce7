"""The REST API: one router per resource (``routes``), response models (``schemas``), the API-key guard, request
size limits, streamed multipart uploads. Routes call the service's methods, never the store or the workers."""

__all__: list[str] = []
