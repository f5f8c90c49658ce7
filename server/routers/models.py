"""The models this service serves."""

from __future__ import annotations

from fastapi import APIRouter

from server.deps import AuthDep, ServiceDep

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[AuthDep])


@router.get("/models", summary="Loaded model bundles",
            responses={200: {"content": {"application/json": {"example": {"models": [{"name": "demo-abdomen-ct"}]}}}}})
def list_models(service: ServiceDep) -> dict:
    out = []
    for name, engine in service.engines.items():
        b = engine.bundle
        out.append({
            "name": name, "version": b.version, "default": name == service.default_model, "modality": b.modality,
            "description": b.manifest.get("description", ""), "device": engine.device,
            "roi": list(b.model.img_size), "spacing": list(b.preprocess.spacing), "orientation": b.preprocess.orientation,
            "intensity_window": list(b.preprocess.window), "mode": b.model.mode,
            "labels": [{"value": l.value, "name": l.name, "color": list(l.color),
                        "snomed": {"value": l.type.value, "meaning": l.type.meaning} if l.type else None} for l in b.labels],
            "metrics": b.manifest.get("metrics"),
        })
    return {"models": out}
