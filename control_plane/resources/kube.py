"""The Kubernetes controller: Plan, Tenant, Model, Limit and Principal custom resources
(k8s/crds/) in one namespace, kept applied with status conditions (settings ``kube_namespace``).

The reconcile core is the config directory's (``Applier``, manager ``kubernetes``): every
change of any object re-applies the whole set in one transaction, with prune over every kind
(the namespace's objects are all there is). :func:`plan` splits the objects into documents and
objects whose spec is invalid; an invalid object is reported on its own status and its resource
is left as it was (never pruned), so one bad object does not hold the others back. An object
the apply itself refuses (a value the admin API rejects, a reference to a missing tenant, a
conflict with another manager) is set aside the same way and the rest applied again without it.

The watch and status patches use lightkube; they are the only part that needs an API server.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from control_plane.admin.auth import Caller
from control_plane.resources.apply import KUBERNETES, Applier, failed_document
from control_plane.resources.documents import Document, document_of
from tessera import resources
from tessera.errors import StorageError, TesseraError
from tessera.resources import SpecError

log = structlog.get_logger("control_plane.kube")
MANAGER = KUBERNETES
CALLER = Caller(MANAGER, MANAGER, platform_admin=True)
DEBOUNCE_SECONDS = 0.2


@dataclass(frozen=True, slots=True)
class Condition:
    """The ``Ready`` condition an object gets."""

    ready: bool
    reason: str  # Applied | InvalidSpec | Rejected | ApplyFailed
    message: str

    def status(self, generation: int, now: datetime) -> dict[str, Any]:
        return {
            "observedGeneration": generation,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if self.ready else "False",
                    "reason": self.reason,
                    "message": self.message[:32768],
                    "lastTransitionTime": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "observedGeneration": generation,
                }
            ],
        }


Key = tuple[str, str]  # (kind, name)


def plan(objects: list[dict[str, Any]]) -> tuple[list[Document], dict[Key, Condition]]:
    """The documents of the valid objects, and a condition for each invalid one."""
    docs: list[Document] = []
    invalid: dict[Key, Condition] = {}
    for obj in objects:
        kind, name = str(obj.get("kind", "")), str(obj.get("metadata", {}).get("name", ""))
        raw = {
            "apiVersion": resources.API_VERSION,
            "kind": kind,
            "metadata": {"name": name},
            "spec": obj.get("spec"),
        }
        try:
            docs.append(document_of(f"{kind}/{name}", raw))
        except SpecError as exc:
            invalid[(kind, name)] = Condition(
                ready=False, reason="InvalidSpec", message=f"{kind}/{name}: {exc}"
            )
    return docs, invalid


async def reconcile(applier: Applier, objects: list[dict[str, Any]]) -> dict[Key, Condition]:
    """Apply the namespace's objects; the condition of each. An object the apply fails at is
    reported (``Rejected``), left as it was, and the rest applied without it. Raises
    StorageError when the store is unavailable (the caller retries)."""
    docs, conditions = await asyncio.to_thread(plan, objects)  # parsing: off the event loop
    while True:
        try:
            response = await applier.apply(
                docs, None, caller=CALLER, prune=True, manager=MANAGER, keep=frozenset(conditions), whole=True
            )
            break
        except StorageError:
            raise
        except TesseraError as exc:
            at = failed_document(exc)
            if at is None or at in conditions:  # not one document's fault: nothing applied
                failed = Condition(ready=False, reason="ApplyFailed", message=f"nothing applied: {exc}")
                return {**dict.fromkeys(((d.kind.name, d.name) for d in docs), failed), **conditions}
            conditions[at] = Condition(ready=False, reason="Rejected", message=str(exc))
            docs = [d for d in docs if (d.kind.name, d.name) != at]
    for warning in response.warnings:
        log.warning("kube_warning", warning=warning)
    changes = {(c.kind, c.name): c for c in response.changes}
    for d in docs:
        c = changes.get((d.kind.name, d.name))
        message = f"{c.action}" + (f" ({', '.join(c.fields)})" if c and c.fields else "") if c else "applied"
        conditions[(d.kind.name, d.name)] = Condition(ready=True, reason="Applied", message=message)
    return conditions


class Controller:
    """Watches the custom resources of ``namespace`` and reconciles on every change."""

    def __init__(self, applier: Applier, namespace: str) -> None:
        from lightkube.generic_resource import create_namespaced_resource  # noqa: PLC0415

        self.applier = applier
        self.namespace = namespace
        self.types = {
            k.name: create_namespaced_resource(resources.GROUP, resources.VERSION, k.name, k.plural)
            for k in resources.KINDS
        }
        self.dirty = asyncio.Event()

    async def run_forever(self) -> None:
        from lightkube import AsyncClient  # noqa: PLC0415

        client = AsyncClient(namespace=self.namespace, field_manager="tessera-control-plane")
        watchers = [asyncio.create_task(self._watch(client, t)) for t in self.types.values()]
        try:
            self.dirty.set()
            while True:
                await self.dirty.wait()
                await asyncio.sleep(DEBOUNCE_SECONDS)  # one reconcile for a burst of events
                self.dirty.clear()
                try:
                    await self._reconcile(client)
                except Exception:
                    log.exception("kube_reconcile_failed")
                    await asyncio.sleep(5)
                    self.dirty.set()
        finally:
            for w in watchers:
                w.cancel()
            await client.close()

    async def _watch(self, client: Any, kind_type: Any) -> None:
        while True:
            try:
                async for _event, _obj in client.watch(kind_type, namespace=self.namespace):
                    self.dirty.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("kube_watch_restarted", kind=kind_type.__name__, exc_info=True)
                await asyncio.sleep(2)

    async def _reconcile(self, client: Any) -> None:
        objects: list[dict[str, Any]] = []
        for kind, kind_type in self.types.items():
            objects.extend(
                [o.to_dict() | {"kind": kind} async for o in client.list(kind_type, namespace=self.namespace)]
            )
        conditions = await reconcile(self.applier, objects)
        now = datetime.now(UTC)
        for obj in objects:
            meta = obj.get("metadata", {})
            cond = conditions.get((obj["kind"], meta.get("name", "")))
            if cond is not None:
                status = cond.status(int(meta.get("generation") or 0), now)
                await client.patch(
                    self.types[obj["kind"]].Status,
                    meta["name"],
                    {"status": status},
                    namespace=self.namespace,
                    patch_type=_merge_patch(),
                )
        log.info(
            "kube_reconciled", objects=len(objects), invalid=sum(not c.ready for c in conditions.values())
        )


def _merge_patch() -> Any:
    from lightkube.types import PatchType  # noqa: PLC0415

    return PatchType.MERGE
