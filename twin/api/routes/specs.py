"""``/api/v1/apply`` (what ``twin apply --server URL`` uses) and ``/api/v1/revisions``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, StrictBool

from twin import policy
from twin.api.deps import PREFIX, Limit, Operator, State, Viewer, change
from twin.api.specio import Specs

router = APIRouter(prefix=PREFIX, tags=["specs"])


class ApplyRequest(BaseModel):
    documents: list[dict[str, Any]]
    prune: StrictBool = False
    message: str = ""


@router.post("/apply")
async def post_apply(
    request: Request, st: State, p: Operator, body: ApplyRequest
) -> dict[str, Any]:
    """What ``twin apply --server URL`` uses: documents of a folder; ``prune`` deletes the rest
    (a scoped user's prune only what they may delete). The policy judges each document the
    plan creates, updates or deletes, on its stored and its new version (``deps.change``);
    documents that stay as they are need no rights."""
    docs: Specs = {}
    for i, doc in enumerate(body.documents):
        name = (
            (doc.get("metadata") or {}).get("name")
            if isinstance(doc.get("metadata"), dict)
            else None
        )
        if not isinstance(doc.get("kind"), str) or not isinstance(name, str):
            raise HTTPException(422, f"documents[{i}] needs kind and metadata.name")
        docs[(doc["kind"], name)] = doc

    def fn(specs: Specs) -> Specs:
        kept = {k: v for k, v in specs.items() if k not in docs}
        if body.prune:  # deletes what the folder lacks, of what this user may delete
            kept = {
                k: v
                for k, v in kept.items()
                if not policy.allows(p, policy.WRITE, old=policy.doc_target(v))
            }
        return {**kept, **docs}

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
