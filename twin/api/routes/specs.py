"""``/api/v1/apply`` (what ``twin apply --server URL`` uses) and ``/api/v1/revisions``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel

from twin.api.deps import PREFIX, Limit, Operator, State, Viewer, change, check_site, site_of
from twin.api.specio import Specs

router = APIRouter(prefix=PREFIX, tags=["specs"])


class ApplyRequest(BaseModel):
    documents: list[dict[str, Any]]
    prune: bool = False
    message: str = ""


@router.post("/apply")
async def post_apply(
    request: Request, st: State, p: Operator, body: ApplyRequest
) -> dict[str, Any]:
    """What ``twin apply --server URL`` uses: documents of a folder; ``prune`` deletes the rest."""
    docs: Specs = {}
    for i, doc in enumerate(body.documents):
        name = (
            (doc.get("metadata") or {}).get("name")
            if isinstance(doc.get("metadata"), dict)
            else None
        )
        if not isinstance(doc.get("kind"), str) or not isinstance(name, str):
            raise HTTPException(422, f"documents[{i}] needs kind and metadata.name")
        check_site(p, doc)
        docs[(doc["kind"], name)] = doc

    def fn(specs: Specs) -> Specs:
        if p.sites or not body.prune:
            kept = {k: v for k, v in specs.items() if k not in docs}
            if body.prune:  # a scoped user prunes only inside their sites
                kept = {k: v for k, v in kept.items() if not p.can_site(site_of(v))}
            return {**kept, **docs}
        return dict(docs)

    engine = st.engine
    before = dict(engine.specs)
    out = await change(request, p, fn, body.message or "apply through the API")
    after = engine.specs
    created = sum(1 for k in after if k not in before)
    deleted = sum(1 for k in before if k not in after)
    updated = sum(1 for k in after if k in before and before[k] != after[k])
    return {**out, "created": created, "updated": updated, "deleted": deleted}


@router.get("/revisions")
async def revisions(st: State, p: Viewer, limit: Limit = 20) -> dict[str, Any]:
    revs = await st.call(st.engine.registry.history, limit)
    return {
        "items": [
            {
                "number": r.number,
                "hash": r.hash,
                "created_at": r.created_at,
                "author": r.author,
                "message": r.message,
                "source": r.source,
            }
            for r in revs
        ]
    }
