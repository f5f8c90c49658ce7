"""The service's one settings object; read here and nowhere else (env prefix ``CTSEG_``)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.backends import DevicePreference, EngineKind
from models.precision import Precision
from server.core.archives import ZipLimits
from server.core.bounds import MB, DicomBounds
from server.core.nodes import Node, Route, check_ae_title, check_unique_names
from server.core.options import SegOptions
from server.core.vocabulary import SegCompression, SegType

DEFAULT_BUNDLES = Path(__file__).resolve().parents[1] / "models" / "bundles"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CTSEG_", env_file=".env", extra="ignore")

    bundle_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=lambda: [DEFAULT_BUNDLES],
                                    description="bundle directories, or folders holding several bundles")
    default_model: str | None = Field(None, description="model used when a request names none (default: first)")
    device: DevicePreference = Field(DevicePreference.AUTO, description="cuda: use a GPU where there is one, else "
                                     "log it and serve on the CPU; cpu: never a GPU")
    engine: EngineKind = Field(EngineKind.AUTO, description="inference backend (auto: cuda where onnxruntime-gpu "
                               "sees a GPU, else torchscript where CTSEG_DEVICE=cuda and only torch sees one, else "
                               "openvino, else onnxruntime); a named one that cannot run here stops the start-up")
    precision: Precision = Field(Precision.AUTO, description="auto: the lowest precision whose parity record of "
                                 "this exact engine passed (ctseg export --parity-ct, ctseg check-precision), else fp32")
    trt_cache_dir: Path | None = Field(None, description="TensorRT engine cache (default: <storage_dir>/tensorrt)")
    ort_threads: int = Field(0, ge=0, description="inference threads, ONNX Runtime or OpenVINO (0: one per core)")
    sw_overlap: float = Field(0.25, ge=0, lt=1)
    sw_batch: int = Field(4, ge=1)
    accumulate_float16: bool = False
    max_upload_mb: int = Field(2048, ge=1)
    zip_max_unpacked_mb: int = Field(2048, ge=1, description="what the zips of one request may unpack to")
    zip_max_members: int = Field(10_000, ge=1, description="files in the zips of one request")
    zip_max_ratio: float = Field(200.0, gt=1, description="uncompressed/compressed size, per member and per zip")
    zip_max_depth: int = Field(1, ge=1, le=5, description="zip nesting unpacked (1: zips inside zips are skipped)")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="accepted X-API-Key values; empty: no auth")
    metrics_public: bool = Field(False, description="with API keys set, serve /metrics without one (a scraper "
                                                    "inside the trusted network)")
    storage_dir: Path = Path("storage")
    retention_hours: float = Field(72.0, gt=0)
    max_queue: int = Field(16, ge=1)
    concurrency: int = Field(1, ge=1, description="inferences at a time (one worker each)")
    worker_mode: Literal["process", "thread"] = Field(
        "process", description="run jobs in worker processes (API never waits on a job's GIL; a killed worker "
                               "fails only its job) or in threads of the API process")
    worker_niceness: int = Field(0, ge=0, le=19, description="nice increment of worker processes (the API "
                                                              "answers first on a busy CPU; costs throughput)")
    sync_timeout_s: float = Field(300.0, gt=0)
    # ---- uploads (docs/operations.md "Upload limits"): a request body that stalls or trickles is cut off with 408
    upload_idle_timeout_s: float = Field(60.0, gt=0, description="a request body that sends nothing for this long "
                                         "is cut off (408) and its job removed")
    upload_min_kib_s: float = Field(64.0, ge=0, description="after the grace period a request body must average at "
                                    "least this rate since its first read, else 408 (0: no rate floor)")
    upload_rate_grace_s: float = Field(30.0, gt=0, description="seconds from a body's first read before the rate "
                                       "floor applies (TCP slow start, a client that reads its files as it sends)")
    max_json_kb: int = Field(64, ge=1, description="a JSON (pull) request body larger than this is refused (413)")
    # ---- the job core (docs/architecture.md)
    job_lease_s: float = Field(30.0, gt=0, description="a running job's lease; its worker renews it every third of "
                               "this, and a job whose lease ran out is given to another worker")
    job_max_attempts: int = Field(3, ge=1, description="runs of one job (its worker stopped or lost its lease) "
                                  "before it is failed with the reason")
    db_busy_timeout_s: float = Field(10.0, gt=0, description="how long one database write waits for a lock held "
                                     "by another connection before it is retried")
    db_patience_s: float = Field(300.0, gt=0, description="how long a write is retried while the database stays "
                                 "locked (a finished job's result is never dropped for a lock)")
    # ---- worker memory (docs/operations.md "Workers that run out of memory")
    worker_memory_mb: int = Field(0, ge=0, description="cap on one worker process's private memory (RLIMIT_DATA; "
                                  "0: none): a job that needs more fails as out of memory instead of the kernel "
                                  "killing workers or the host; must leave room for the bundles (a few hundred MB)")
    worker_restart_backoff_s: float = Field(30.0, gt=0, description="after more than 5 worker deaths in a minute, "
                                            "no worker is started for this long, then one is tried; doubled each "
                                            "time the storm goes on")
    worker_restart_backoff_max_s: float = Field(600.0, gt=0, description="cap on that pause")
    # ---- declared sizes (docs/operations.md "Input bounds"): what a DICOM header may declare, refused at staging
    dicom_max_rows_columns: int = Field(DicomBounds.max_rows_columns, ge=1, description="Rows and Columns of one "
                                        "image (RLE, JPEG 2000 and deflate declare any size in a few kilobytes)")
    dicom_max_frames: int = Field(DicomBounds.max_frames, ge=1, description="frames of one (Enhanced CT) instance")
    dicom_max_frame_mb: float = Field(DicomBounds.max_frame_bytes / MB, gt=0, description="one decoded frame: "
                                      "Rows x Columns x SamplesPerPixel x bytes per sample")
    dicom_max_volume_mvoxels: float = Field(DicomBounds.max_volume_voxels / 1e6, gt=0, description="the chosen "
                                            "series, in millions of voxels (a worker holds 2 bytes each, more while "
                                            "it segments)")
    dicom_max_header_mb: float = Field(DicomBounds.max_header_bytes / MB, gt=0, description="a deflated data set's "
                                       "header inflated in the API process (its memory bound per file read); the "
                                       "whole may inflate to its declared pixel data plus this, else a deflate bomb")
    seg_type: SegType = SegType.BINARY
    seg_keep_empty_frames: bool = False
    seg_compression: SegCompression = SegCompression.NONE
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "INFO"
    # ---- several machines (README "Running on several machines"; server/core/blobs.py)
    role: Literal["all", "api", "dicom", "worker"] = Field(
        "all", description="which part of ctseg this process is (README 'Running on several machines'): all, the "
                           "single box; api, a stateless REST replica; dicom, a DICOM receiver; worker, one inference "
                           "worker (one per GPU). Every role but all needs a postgresql:// CTSEG_DATABASE_URL")
    worker_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="role worker: the models (bundle names) it serves, comma-separated; "
                                          "empty: every bundle it has")
    viewer_url: str | None = Field(None, description="a web viewer (OHIF, docker-compose --profile pacs: "
                                   "http://127.0.0.1:3000) reading the same PACS: each job with DICOM input links "
                                   "its study there (viewer_url)")
    database_url: SecretStr | None = Field(None, description="the job database: unset, SQLite in the storage "
                                           "folder; postgresql://user:password@host/db, the store several machines "
                                           "share (migrated at start, or by `ctseg db upgrade`)")
    blob_url: str | None = Field(None, description="where job files live: unset, the storage folder; "
                                 "file:///shared/path (a volume every machine mounts there) or s3://bucket/prefix")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph) for an s3:// "
                                        "CTSEG_BLOB_URL; credentials from the usual AWS variables, never from here")
    log_exception_messages: bool = Field(False, description="write exception messages in tracebacks (they can quote "
                                         "paths, UIDs and header values): for debugging on test data only")

    # ---- PACS integration (README "Connecting to your PACS")
    destinations: list[Node] = Field(default_factory=list, description="JSON list of SEG destinations "
                                     '(e.g. [{"name": "pacs", "kind": "dicomweb", "url": "http://pacs:8042/dicom-web"}])')
    default_destinations: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="destination names that receive every job's SEG unless the job names its own")
    sources: list[Node] = Field(default_factory=list, description="JSON list of nodes to pull series from by UID")
    dicom_port: int | None = Field(None, ge=1, le=65535, description="DICOM listener (C-STORE SCP) port; unset: none")
    dicom_host: str | None = Field(None, description="DICOM listener address (default: CTSEG_HOST)")
    dicom_ae_title: str = Field("CTSEG", description="the service's AE title (called by senders, calling when it sends)")
    dicom_allowed_ae_titles: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="calling AE titles accepted by the listener; empty: any")
    dicom_stable_seconds: float = Field(30.0, gt=0, description="a received series is complete after this long "
                                                                "without a new instance (Orthanc's StableAge)")
    routes: list[Route] = Field(default_factory=lambda: [Route()], description="JSON list of routing rules for "
                                "received series; default: CT with at least 20 slices -> default model")
    dicom_reassembly_minutes: float = Field(
        60.0, ge=0, description="a routed series' instances are kept this long: instances that arrive later run the "
        "series again whole, superseding the job made of the first part")
    dicom_incomplete_hold_minutes: float = Field(
        60.0, ge=0, description="a series cut off by an aborted association waits this long to be sent again "
        "complete; then it is a failed job saying so")
    # ---- DICOM trust (docs/operations.md "DICOM trust")
    dicom_allow_any_ae: bool = Field(True, description="with the listener on and no CTSEG_DICOM_ALLOWED_AE_TITLES, "
                                     "accept any calling AE title (a warning at start-up while DIMSE destinations "
                                     "exist); false: that is a start-up error")
    dicom_max_instance_mb: int = Field(1024, ge=1, description="largest instance the listener takes (a whole Enhanced "
                                       "CT volume of 2000 512x512 slices is 1 GB); a larger one aborts its "
                                       "association and at most this much of one is written to disk")
    dicom_allowed_peers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="peer addresses (IPs or CIDRs, comma-separated) the DICOM listener accepts "
        "associations from; others are rejected at association; empty: any")

    @field_validator("dicom_allowed_peers", mode="before")
    @classmethod
    def _peer_networks(cls, value: object) -> object:
        """One spelling per network (``10.0.0.5`` is ``10.0.0.5/32``); a malformed entry is a start-up error."""
        items = value.replace(";", ",").split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            return value
        try:
            return [str(ipaddress.ip_network(str(v).strip(), strict=False)) for v in items if str(v).strip()]
        except ValueError as err:
            raise ValueError(f"CTSEG_DICOM_ALLOWED_PEERS: {err}") from None

    @model_validator(mode="after")
    def _dicom_trust(self) -> Settings:
        if self.dicom_port is not None and not self.dicom_allow_any_ae and not self.dicom_allowed_ae_titles:
            raise ValueError("CTSEG_DICOM_ALLOW_ANY_AE is false: the DICOM listener needs CTSEG_DICOM_ALLOWED_AE_TITLES "
                             "(the calling AE titles it accepts)")
        return self

    delivery_retry_base_s: float = Field(5.0, gt=0, description="first retry delay; doubled each attempt")
    delivery_retry_max_s: float = Field(300.0, gt=0, description="cap on the delay between two attempts")
    delivery_probe_max_s: float = Field(30.0, gt=0, description="while a destination does not answer, it is checked "
                                        "(C-ECHO, HTTP) at least this often; the first answer drains its SEGs")
    delivery_give_up_hours: float = Field(72.0, gt=0, description="a delivery still failing after this is failed")
    delivery_max_senders: int = Field(2, ge=1, description="associations (one per sending replica) open to one "
                                      "destination at a time, across all replicas sharing the database")

    @model_validator(mode="after")
    def _seg_compression_fits_type(self) -> Settings:
        self.seg_options()  # the one check, in SegOptions
        return self

    @model_validator(mode="after")
    def _nodes_are_consistent(self) -> Settings:
        check_unique_names(self.destinations, "destinations")
        check_unique_names(self.sources, "sources")
        known = {d.name for d in self.destinations}
        for name in self.default_destinations:
            if name not in known:
                raise ValueError(f"default_destinations names {name!r}, which is not among the destinations "
                                 f"{sorted(known)} (CTSEG_DESTINATIONS)")
        for route in self.routes:
            for name in route.destinations or []:
                if name not in known:
                    raise ValueError(f"a route names destination {name!r}, which is not among {sorted(known)}")
        self.dicom_ae_title = check_ae_title(self.dicom_ae_title)
        self.dicom_allowed_ae_titles = [check_ae_title(t) for t in self.dicom_allowed_ae_titles]
        return self

    def seg_options(self) -> SegOptions:
        return SegOptions(self.seg_type, self.seg_keep_empty_frames, self.seg_compression)

    def zip_limits(self) -> ZipLimits:
        return ZipLimits(self.zip_max_unpacked_mb * 2**20, self.zip_max_members, self.zip_max_ratio, self.zip_max_depth)

    def dicom_bounds(self) -> DicomBounds:
        return DicomBounds(self.dicom_max_rows_columns, self.dicom_max_frames, int(self.dicom_max_frame_mb * MB),
                           int(self.dicom_max_volume_mvoxels * 1e6), int(self.dicom_max_header_mb * MB))

    def destination(self, name: str) -> Node:
        for node in self.destinations:
            if node.name == name:
                return node
        raise KeyError(name)

    @model_validator(mode="after")
    def _roles_share_a_database(self) -> Settings:
        url = self.database_url.get_secret_value() if self.database_url else ""
        if self.role != "all" and not url.startswith(("postgresql", "postgres:")):
            raise ValueError(f"CTSEG_ROLE={self.role} runs beside other ctseg processes, which share their jobs "
                             "through PostgreSQL: set CTSEG_DATABASE_URL=postgresql://... (or CTSEG_ROLE=all)")
        return self

    @property
    def replicated(self) -> bool:
        """This process is one of several sharing the database (and the job files): nothing found at start can be
        taken for its own leftovers; leases, not a storage lock, say what was abandoned."""
        return self.role != "all"

    @field_validator("bundle_dirs", "api_keys", "default_destinations", "dicom_allowed_ae_titles", "worker_models",
                     mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.replace(";", ",").split(",") if v.strip()]
        return value
