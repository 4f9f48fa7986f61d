"""Hospital integration: talking to a PACS over DICOMweb (QIDO-RS search, WADO-RS retrieve, STOW-RS store).

:mod:`pipeline.pacs.dicomweb` is the one client; the ``dicomweb`` dataset source
(:mod:`pipeline.data.sources.dicomweb`) pulls training data through it.
"""

from __future__ import annotations

from pipeline.pacs.dicomweb import InstanceRef, PacsAuth, PacsClient, StoreResult

__all__ = ["InstanceRef", "PacsAuth", "PacsClient", "StoreResult"]
