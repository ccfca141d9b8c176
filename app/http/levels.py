"""Per-level state of the served chain, as /v1/models and /health/ready report it."""

from __future__ import annotations

from app.core.dispatch import FleetStatus
from app.core.service import EmbeddingService
from app.http.schemas import LevelInfo


async def levels_info(service: EmbeddingService) -> tuple[list[LevelInfo], int, FleetStatus]:
    """Each level's info, the largest k servable now (0: none), and the fleet's status."""
    st = await service.dispatcher.status()
    infos, ready_dim = [], 0
    for i, lv in enumerate(service.artifact.levels):
        infos.append(
            LevelInfo(
                name=lv.name,
                dim=lv.dim,
                model_id=lv.model_id,
                revision=lv.revision,
                loaded=st.loaded[i],
                ready=st.ready[i],
            )
        )
        if all(st.ready[: i + 1]) and st.workers:
            ready_dim = lv.dim
    return infos, ready_dim, st
