"""The models this service serves."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import AuthDep, ServiceDep
from server.api.schemas import CodeOut, LabelOut, ModelOut, ModelsOut

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[AuthDep])


@router.get("/models", response_model=ModelsOut, summary="Loaded model bundles")
def list_models(service: ServiceDep) -> ModelsOut:
    out = []
    for name, engine in service.engines.items():
        b = engine.bundle
        out.append(ModelOut(
            name=name, version=b.version, default=name == service.default_model, modality=b.modality,
            description=str(b.manifest.get("description", "")), device=engine.device,
            engine=engine.choice.engine.value, precision=engine.choice.precision.value,
            precision_reason=engine.choice.reason,
            roi=list(b.model.img_size), spacing=list(b.preprocess.spacing), orientation=b.preprocess.orientation,
            intensity_window=list(b.preprocess.window), mode=b.model.mode,
            labels=[LabelOut(value=label.value, name=label.name, color=list(label.color),
                             snomed=CodeOut(value=label.type.value, meaning=label.type.meaning) if label.type else None)
                    for label in b.labels],
            metrics=b.manifest.get("metrics"),
        ))
    return ModelsOut(models=out)
