"""The inference service. Packages by role, each importing only those below it (pyproject.toml's import-linter
contract; docs/architecture.md):

    app, cli, predict_cli        entry points
    api                          REST routes, schemas, security, limits
    service                      wires the parts together
    jobs | dicomnode             the job core | the DICOM listener and its arrival buffer
    pacs | inference             DICOMweb and DIMSE clients | engines and the pipeline
    imaging                      DICOM/NIfTI reading, SEG writing, preview
    core                         settings, nodes, vocabularies, errors, metrics, durable writes
"""
