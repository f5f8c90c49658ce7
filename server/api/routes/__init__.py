"""One router per resource: health, models, segmentations."""
