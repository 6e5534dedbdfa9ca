"""Champion, challenger and fallback as the registry's aliases, read by routing, the pipeline and pruning; and
`vitrine models fallback`, which puts the previous champion back in one command.

- **Which versions must stay** (`protected_versions`): every version an alias names (champion, challenger,
  fallback) and every version a variant of the current experiment pins. `prune` never removes them, and the
  export keeps serving them (`ModelSpec.served_versions`), so the fallback is on disk *and* loadable.
- **Fallback** (`fall_back`): the registry's `fallback` version becomes `champion` and the old champion becomes
  `fallback` (a second fallback undoes the first). Routing follows: every variant that serves the model pinned
  to the old champion's Triton version, or to "newest", is pinned to the fallback's Triton version — one
  audited `ExperimentStore.save`, which every gateway follows over pub/sub. Clients change nothing: same
  endpoint, same variant names, same keys.

  Order, so that a failure half-way can be finished by running the command again: (1) read the aliases (no
  fallback → error), (2) make the fallback's Triton version READY (loaded through the repository API if
  needed) and refuse if it cannot be, (3) move routing, (4) move the aliases (`Registry.promote` of the fallback).
  If (4) fails, routing already serves the fallback and the error names the one command that finishes it:
  `vitrine models promote MODEL <fallback version>`, correct from the untouched aliases and from a half-moved
  pair alike (`fallback` is moved before `champion`).
"""

from __future__ import annotations

import getpass
import json
import socket
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vitrine.export.registry import Registry
    from vitrine.services.gateway.experiment import Experiment
    from vitrine.settings import Settings


class FallbackError(RuntimeError):
    """`vitrine models fallback` cannot proceed; the message says why and what is unchanged."""


# --- pure parts: unit-tested -----------------------------------------------------------------------------

def pinned_versions(variants: Iterable[tuple[str, str]], model: str) -> set[int]:
    """Triton versions of `model` that variants (model name, version; "" = newest) pin."""
    return {int(version) for name, version in variants if name == model and version}


def route_to_fallback(experiment: Experiment, model: str, old_version: int | None, new_version: int) -> tuple[Experiment, list[str]]:
    """The experiment with every variant serving `model` at `old_version` (the old champion's Triton version) or at
    "newest" pinned to `new_version`; and the names of the variants changed. Other variants, weights, the salt and
    the mode are untouched, so no user changes variant."""
    if new_version < 1:
        raise ValueError(f"Triton version {new_version}: versions start at 1")
    moved = []
    variants = []
    for variant in experiment.variants:
        serves_old = variant.model_version == "" or (old_version is not None and variant.model_version == str(old_version))
        if variant.model_name == model and serves_old and variant.model_version != str(new_version):
            variants.append(variant.model_copy(update={"model_version": str(new_version)}))
            moved.append(variant.name)
        else:
            variants.append(variant)
    return experiment.model_copy(update={"variants": tuple(variants)}), moved


def with_version_served(config: dict, ready: Iterable[int], version: int) -> dict:
    """Triton's model config (as JSON) changed to serve exactly the `ready` versions plus `version` (policy `specific`):
    the config override of a repository `load` that adds one version without unloading the others."""
    changed = json.loads(json.dumps(config))
    changed["version_policy"] = {"specific": {"versions": sorted({*map(int, ready), int(version)})}}
    return changed


# --- the registry and Redis ------------------------------------------------------------------------------

def registry_protected(registry: Registry, model: str) -> set[int]:
    """Triton versions the registry's aliases name (champion, challenger, fallback)."""
    return set(registry.aliased_triton_versions(model).values())


async def experiment_pins(settings: Settings, model: str) -> set[int]:
    """Triton versions of `model` the current experiment pins (read from Redis, as the gateways do)."""
    import redis.asyncio as aioredis

    from vitrine.services.gateway.experiment import ExperimentStore

    client = aioredis.Redis(host=settings.redis.host, port=settings.redis.port, socket_connect_timeout=2, socket_timeout=5)
    try:
        experiment = await ExperimentStore(client, settings.features.namespace).load()
    except (aioredis.RedisError, OSError) as exc:
        raise FallbackError(f"the experiment store (Redis at {settings.redis.host}:{settings.redis.port}) does not answer "
                            f"({type(exc).__name__}); cannot tell which versions the experiment pins") from exc
    finally:
        await client.aclose()
    if experiment is None:
        return set()
    return pinned_versions(((v.model_name, v.model_version) for v in experiment.variants), model)


async def protected_versions(settings: Settings, registry: Registry | None, model: str) -> frozenset[int]:
    """What `prune` must keep for `model`: the aliases' versions (when there is a registry) and the experiment's pins."""
    versions = registry_protected(registry, model) if registry is not None else set()
    return frozenset(versions | await experiment_pins(settings, model))


# --- Triton ----------------------------------------------------------------------------------------------

async def ensure_ready(grpc_url: str, model: str, version: int, timeout_s: float = 120) -> str:
    """Make `model` version `version` READY in Triton; returns how ("already ready", "loaded …"). Loading goes
    through the repository API: first a plain load (the folder's own version policy), then, if the version is
    outside that policy, a load whose config override serves the ready versions plus this one — the others keep
    serving throughout. FallbackError when the version cannot be made ready."""
    import tritonclient.grpc.aio as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(grpc_url)
    try:
        try:
            if await client.is_model_ready(model, str(version)):
                return "already ready"
            ready = await _ready_versions(client, model)
        except InferenceServerException as exc:
            raise FallbackError(f"Triton at {grpc_url} does not answer ({exc.message()})") from exc
        try:
            if not ready:
                await client.load_model(model, client_timeout=timeout_s)
                if await client.is_model_ready(model, str(version)):
                    return "loaded with the model folder's version policy"
                ready = await _ready_versions(client, model)
            current = await client.get_model_config(model, as_json=True)
            config = with_version_served(current.get("config", current), ready, version)
            await client.load_model(model, config=json.dumps(config), client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise FallbackError(f"Triton could not load {model} version {version}: {exc.message()}") from exc
        if not await client.is_model_ready(model, str(version)):
            raise FallbackError(f"Triton loaded {model} but version {version} is not READY (is its folder in the repository?)")
        return f"loaded through the repository API (serving versions {', '.join(map(str, sorted({*ready, version})))})"
    finally:
        await client.close()


async def _ready_versions(client, model: str) -> list[int]:  # noqa: ANN001 - tritonclient.grpc.aio client
    """The versions of `model` Triton's repository index reports READY."""
    index = await client.get_model_repository_index(as_json=True)
    return sorted(int(m["version"]) for m in index.get("models", [])
                  if m.get("name") == model and m.get("state") == "READY" and str(m.get("version", "")).isdigit())


# --- the command -----------------------------------------------------------------------------------------

@dataclass
class FallbackResult:
    model: str
    champion_before: str | None
    """Registry versions (the alias' targets)."""
    champion_after: str
    fallback_after: str | None
    triton_before: int | None
    triton_after: int
    readiness: str
    variants_moved: list[str] = field(default_factory=list)
    experiment_revision: int | None = None
    aliases: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _who() -> str:
    try:
        return f"vitrine models fallback ({getpass.getuser()}@{socket.gethostname()})"
    except (KeyError, OSError):
        return "vitrine models fallback"


async def fall_back(settings: Settings, registry: Registry, model: str, by: str | None = None) -> FallbackResult:
    """The fallback version becomes champion, routing follows (see the module's docstring for the order)."""
    import redis.asyncio as aioredis

    from vitrine.export.registry import CHAMPION, FALLBACK, RegistryError, _quote, fallback_moves
    from vitrine.services.gateway.experiment import ConflictError, ExperimentStore

    aliases = registry.aliases(model)
    if not aliases and not registry.client.search_registered_models(filter_string=f"name = '{_quote(model)}'"):
        raise FallbackError(f"no registered model {model!r} in {registry.tracking_url}")
    try:
        moves = fallback_moves(aliases)
        new_triton = registry.triton_version(model, aliases[FALLBACK])
        old_triton = registry.triton_version(model, aliases[CHAMPION]) if CHAMPION in aliases else None
    except RegistryError as exc:
        raise FallbackError(f"{model}: {exc}; nothing changed") from exc
    readiness = await ensure_ready(settings.triton.grpc_url, model, new_triton)

    client = aioredis.Redis(host=settings.redis.host, port=settings.redis.port, socket_connect_timeout=2, socket_timeout=5)
    store = ExperimentStore(client, settings.features.namespace)
    moved: list[str] = []
    revision = None
    try:
        experiment = await store.load()
        if experiment is not None:
            routed, moved = route_to_fallback(experiment, model, old_triton, new_triton)
            revision = experiment.revision
            if moved:
                revision = (await store.save(routed, by=by or _who(), expected_revision=experiment.revision)).revision
    except ConflictError as exc:
        raise FallbackError(f"the experiment changed while it was being routed ({exc}); nothing changed, run it again") from exc
    except (aioredis.RedisError, OSError) as exc:
        raise FallbackError(f"the experiment store (Redis at {settings.redis.host}:{settings.redis.port}) does not answer "
                            f"({type(exc).__name__}); routing and aliases unchanged (Triton serves version {new_triton} too)") from exc
    finally:
        await client.aclose()
    try:
        registry.swap_to_fallback(model)
    except Exception as exc:  # noqa: BLE001 - routing moved already: say so, and how to finish
        raise FallbackError(
            f"routing moved to {model} version {new_triton} ({', '.join(moved) or 'no variant served the old champion'}), "
            f"but the registry's aliases could not be moved ({type(exc).__name__}: {exc}); finish with "
            f"`vitrine models promote {model} {aliases[FALLBACK]}` (it makes the old champion the fallback)") from exc
    return FallbackResult(model=model, champion_before=aliases.get(CHAMPION), champion_after=moves[CHAMPION],
                          fallback_after=moves.get(FALLBACK), triton_before=old_triton, triton_after=new_triton,
                          readiness=readiness, variants_moved=moved, experiment_revision=revision,
                          aliases=registry.aliases(model))
