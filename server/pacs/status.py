"""DIMSE statuses by name and category (PS3.7 C, PS3.4 B.2.3 and C.4.3), from pynetdicom's status tables.

Decisions are made on the *category* pynetdicom assigns (Success, Warning, Failure, Cancel, Pending), never on
hand-copied ranges of hex codes; the codes ctseg itself answers with are named here once. Messages name a status
by its meaning with the code after it, e.g. "Attribute Value Out of Range (0x0116)".
"""

from __future__ import annotations

from enum import Enum, IntEnum

from pynetdicom import status as _pynetdicom_status


class Category(str, Enum):
    SUCCESS = "Success"
    WARNING = "Warning"
    FAILURE = "Failure"
    CANCEL = "Cancel"
    PENDING = "Pending"
    UNKNOWN = "Unknown"


class StoreStatus(IntEnum):
    """What ctseg's C-STORE SCP answers."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # the sender keeps the instance and retries (disk full, database unavailable)
    CANNOT_UNDERSTAND = 0xC000  # the data set cannot be read or lacks its UIDs
    # Over CTSEG_DICOM_MAX_INSTANCE_MB. A7xx is the storage service's one "refused, not stored, for lack of
    # resources" range (PS3.4 B.2.3): the instance is not wrong (Cxxx) nor of the wrong class (A9xx), it is more than
    # this service agreed to hold. A code of its own in that range tells it from the transient disk-full 0xA700 in
    # both sides' logs; a sender that retries meets the same limit until the operator raises it.
    INSTANCE_TOO_LARGE = 0xA701


class Service(str, Enum):
    """The same code means different things per service (0xB000: coercion for C-STORE, failed sub-operations for
    C-GET)."""

    STORE = "C-STORE"
    GET = "C-GET"


_TABLES = {
    Service.STORE: (_pynetdicom_status.STORAGE_SERVICE_CLASS_STATUS, _pynetdicom_status.GENERAL_STATUS),
    Service.GET: (_pynetdicom_status.QR_GET_SERVICE_CLASS_STATUS, _pynetdicom_status.GENERAL_STATUS),
}
# Refusals that mean "not now" rather than "not this" (the peer is out of resources): retried later.
_TRANSIENT_MEANINGS = ("Out of Resources", "Resource Limitation")


def category(code: int) -> Category:
    try:
        return Category(_pynetdicom_status.code_to_category(code))
    except ValueError:
        return Category.UNKNOWN


def meaning(code: int, service: Service = Service.STORE) -> str:
    for table in _TABLES[service]:
        if code in table:
            text = table[code][1]
            if text:
                return text
    return category(code).value


def describe(code: int, service: Service = Service.STORE) -> str:
    """``'Refused: Out of Resources (0xA700)'``: the meaning first, the code only to look it up."""
    return f"{meaning(code, service)} (0x{code:04X})"


def stored(code: int) -> bool:
    """C-STORE: the peer kept the instance (success, or a warning such as coercion or a value out of range)."""
    return category(code) in (Category.SUCCESS, Category.WARNING)


def transient(code: int) -> bool:
    """A failure the same request may overcome later (the peer is out of resources)."""
    return category(code) is Category.FAILURE and any(m.lower() in meaning(code).lower() for m in _TRANSIENT_MEANINGS)
