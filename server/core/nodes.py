"""PACS nodes (where SEGs go, where series come from) and routing rules, as validated settings types.

Destinations and sources share one shape: a ``name``, a ``kind`` (``dicomweb`` or ``dimse``) and that kind's
address. They are read from JSON lists in ``CTSEG_DESTINATIONS`` / ``CTSEG_SOURCES``; every rule is checked when
the settings load, so a typo is a start-up error naming the field, not a delivery that fails at 3 a.m.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from server.core.options import PhaseChoice
from server.core.vocabulary import NodeKind, Output, parse_outputs

NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


def check_ae_title(value: str) -> str:
    """DICOM PS3.5 AE: 1-16 characters of the default repertoire, no backslash or control characters."""
    title = value.strip()
    if not 1 <= len(title) <= 16:
        raise ValueError(f"an AE title has 1 to 16 characters; got {value!r}")
    if any(c == "\\" or not 32 <= ord(c) < 127 for c in title):
        raise ValueError(f"an AE title may not hold a backslash or control/non-ASCII characters; got {value!r}")
    return title


AETitle = Annotated[str, Field(description="DICOM application entity title (1-16 characters)")]


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, description="the name jobs and routes use")
    timeout_s: float = Field(30.0, gt=0, le=3600, description="network timeout of one exchange")


class _Destination(BaseModel):
    """What a destination receives: the DICOM objects of each job sent to it (``objects``)."""

    objects: tuple[Output, ...] = Field((Output.DICOM_SEG,), description="the DICOM objects a job sends here, as "
                                        "the API's outputs: dicom-seg, rtstruct, sr, sc (default: dicom-seg); a "
                                        "planning system takes rtstruct, a PACS dicom-seg,sr,sc")

    @field_validator("objects", mode="before")
    @classmethod
    def _objects(cls, value: object) -> object:
        """Read by the API's own parser; a JSON list is joined. Only DICOM objects can be sent."""
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        objects = parse_outputs(value) if isinstance(value, str) else value
        if isinstance(objects, tuple) and Output.NIFTI in objects:
            raise ValueError("a destination receives DICOM objects (dicom-seg, rtstruct, sr, sc), not nifti")
        return objects


class DicomWebNode(_Node, _Destination):
    """A DICOMweb service: STOW-RS to store, WADO-RS to retrieve (``url`` is the DICOMweb root)."""

    kind: Literal[NodeKind.DICOMWEB]
    url: str = Field(description="DICOMweb root, e.g. http://pacs:8042/dicom-web")
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = Field(None, description="bearer token (instead of username/password)")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"url must be an http(s) URL of the DICOMweb root; got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_auth(self) -> DicomWebNode:
        if (self.username is None) != (self.password is None):
            raise ValueError(f"destination/source {self.name!r}: basic auth needs both username and password")
        if self.token is not None and self.username is not None:
            raise ValueError(f"destination/source {self.name!r}: give either a bearer token or username/password")
        return self


class DimseNode(_Node, _Destination):
    """A DICOM (DIMSE) peer: C-STORE to store, C-GET to retrieve."""

    kind: Literal[NodeKind.DIMSE]
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    ae_title: AETitle = Field(description="the peer's (called) AE title")
    calling_ae_title: AETitle | None = Field(None, description="ctseg's AE title towards it (default: CTSEG_DICOM_AE_TITLE)")

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else check_ae_title(value)


Node = Annotated[DicomWebNode | DimseNode, Field(discriminator="kind")]


def normal_address(text: str) -> str:
    """One spelling per IP address: a peer seen by a dual-stack listener as ``::ffff:10.0.0.5`` is ``10.0.0.5``,
    and a scope (``%eth0``) is dropped; text that is no IP address is returned as it is."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def resolve_addresses(host: str) -> frozenset[str]:
    """The IP addresses ``host`` names (an IP address names itself; a host name every address DNS gives), so a peer
    is compared by address, never by the name it could claim; empty when the name does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return frozenset()
    return frozenset(normal_address(str(info[4][0])) for info in infos)


class Route(BaseModel):
    """Which received series run, on which model, what they produce and where their SEG goes. The first matching
    route wins."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: str = Field("CT", description="the series' Modality")
    series_description: str | None = Field(None, description="regular expression searched in SeriesDescription")
    min_slices: int = Field(20, ge=1, description="fewer slices (frames) than this: not run (scouts, key images)")
    model: str | None = Field(None, description="bundle name (default: the service's default model)")
    destinations: list[str] | None = Field(None, description="destination names (default: the sender if it is a "
                                                             "destination, else CTSEG_DEFAULT_DESTINATIONS)")
    phase: str | None = Field(None, description="series holding several acquisitions (phases): which one to run, "
                                                "'first', 'last' or its number (default: none; such a series fails "
                                                "with the phases listed)")
    outputs: tuple[Output, ...] = Field((Output.DICOM_SEG,), description="what a routed series' job writes, as the "
                                        "API's outputs: a comma-separated list of nifti, dicom-seg, rtstruct, sr, sc "
                                        "(default: dicom-seg); its destinations still receive the SEG only")
    review: bool = Field(False, description="deliveries of its jobs wait (held) until a person releases or "
                                            "discards them (POST /v1/segmentations/{id}/release or /discard)")

    @field_validator("outputs", mode="before")
    @classmethod
    def _outputs(cls, value: object) -> object:
        """Read by the API's own parser, so a route and a request spell outputs alike; a JSON list is joined."""
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        return parse_outputs(value) if isinstance(value, str) else value

    @field_validator("series_description")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"series_description is not a valid regular expression ({err}): {value!r}") from None
        return value

    @field_validator("phase")
    @classmethod
    def _phase(cls, value: str | None) -> str | None:
        return None if value is None else str(PhaseChoice(value))

    def matches(self, modality: str, description: str, slices: int) -> bool:
        return (modality.upper() == self.modality.upper() and slices >= self.min_slices
                and (self.series_description is None or re.search(self.series_description, description) is not None))


def check_unique_names(nodes: list[DicomWebNode | DimseNode], what: str) -> None:
    seen: set[str] = set()
    for node in nodes:
        if node.name in seen:
            raise ValueError(f"two {what} are named {node.name!r}; names must be unique")
        seen.add(node.name)
