"""ctseg as a DICOM node: the C-STORE SCP (``listener``) and its arrival buffer (``arrivals``): received instances,
the associations that brought them, and when a series is complete and due."""

from server.dicomnode.arrivals import ArrivalStore, ArrivedSeries
from server.dicomnode.listener import DicomListener

__all__ = ["ArrivalStore", "ArrivedSeries", "DicomListener"]
