"""Champion, challenger and fallback as registry aliases, without a registry: the alias moves of a promotion and of a
fallback, what pruning keeps, the routing change of `vitrine models fallback`, the pipeline's champion rule, and the
command's input validation (export/registry.py, export/aliases.py, export/triton_repository.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from typer.testing import CliRunner

from vitrine.cli import app
from vitrine.export.aliases import pinned_versions, route_to_fallback, with_version_served
from vitrine.export.pipeline.champion import NEWEST_READY, REGISTRY_SOURCE, choose
from vitrine.export.registry import CHAMPION, FALLBACK, RegistryError, fallback_moves, promotion_moves
from vitrine.export.triton_repository import (
    ModelSpec,
    TensorSpec,
    cpu_config,
    production_config,
    prunable,
    prune,
    versions,
    withdraw,
    write_model_folder,
)
from vitrine.services.gateway.experiment import Experiment, Variant

runner = CliRunner()


# --- promotion and fallback: alias moves -----------------------------------------------------------------

def test_promoting_a_new_version_makes_the_previous_champion_the_fallback() -> None:
    assert promotion_moves({CHAMPION: "2", "challenger": "3"}, "3") == {CHAMPION: "3", FALLBACK: "2"}
    # The first champion has no fallback; promoting the champion again moves nothing (a retry keeps the fallback).
    assert promotion_moves({"challenger": "1"}, "1") == {CHAMPION: "1"}
    assert promotion_moves({CHAMPION: "3", FALLBACK: "2"}, "3") == {}
    # A third version: the old fallback loses its alias (it becomes prunable), the old champion is the fallback.
    assert promotion_moves({CHAMPION: "3", FALLBACK: "2"}, "4") == {CHAMPION: "4", FALLBACK: "3"}
    with pytest.raises(RegistryError, match="not a registry version"):
        promotion_moves({}, "v3")


def test_fallback_swaps_champion_and_fallback_and_a_second_fallback_undoes_it() -> None:
    first = fallback_moves({CHAMPION: "3", FALLBACK: "2", "challenger": "3"})
    assert first == {CHAMPION: "2", FALLBACK: "3"}
    assert fallback_moves({CHAMPION: "2", FALLBACK: "3"}) == {CHAMPION: "3", FALLBACK: "2"}
    # A fallback without a champion (the champion alias deleted by hand) still puts it back.
    assert fallback_moves({FALLBACK: "2"}) == {CHAMPION: "2"}


def test_fallback_without_a_fallback_alias_or_onto_itself_is_refused() -> None:
    with pytest.raises(RegistryError, match="no version has the alias `fallback`"):
        fallback_moves({CHAMPION: "3", "challenger": "4"})
    with pytest.raises(RegistryError, match="both champion and fallback"):
        fallback_moves({CHAMPION: "3", FALLBACK: "3"})


# --- pruning keeps protected versions ---------------------------------------------------------------------

def test_prune_keeps_the_newest_and_every_protected_version(tmp_path: Path) -> None:
    assert prunable([1, 2, 3, 4, 5], 3) == [1, 2]
    assert prunable([1, 2, 3, 4, 5], 3, {1}) == [2]  # version 1 is the champion (or fallback, or pinned)
    assert prunable([1, 2, 3, 4, 5], 1, {1, 3}) == [2, 4]
    with pytest.raises(ValueError, match="at least 1"):
        prunable([1], 0)
    for v in (1, 2, 3, 4):
        (tmp_path / str(v)).mkdir()
    assert prune(tmp_path, 2, frozenset({1})) == [2]
    assert versions(tmp_path) == [1, 3, 4]


SPEC = ModelSpec(name="m", inputs=(TensorSpec("x", __import__("numpy").dtype("int64"), (-1,)),),
                 outputs=(TensorSpec("y", __import__("numpy").dtype("float32"), (-1,)),), keep_versions=2)


def test_a_config_serves_exactly_the_kept_versions_when_a_protected_one_is_old() -> None:
    default = production_config(SPEC)
    assert default.version_policy.WhichOneof("policy_choice") == "latest" and default.version_policy.latest.num_versions == 2
    pinned = cpu_config(ModelSpec(**{**SPEC.__dict__, "served_versions": (1, 4, 5)}))
    assert pinned.version_policy.WhichOneof("policy_choice") == "specific"
    assert list(pinned.version_policy.specific.versions) == [1, 4, 5]


def test_a_withdrawn_version_leaves_the_repository_and_the_specific_policy(tmp_path: Path) -> None:
    folder = write_model_folder(tmp_path, ModelSpec(**{**SPEC.__dict__, "served_versions": (1, 2, 3)}))
    for v in (1, 2, 3):
        (folder / str(v)).mkdir()
        (folder / str(v) / "model.onnx").write_bytes(b"x")
    where = withdraw(folder / "3")
    assert where == folder / ".rejected-3" and (where / "model.onnx").is_file()
    assert versions(folder) == [1, 2]
    for path in (folder / "config.pbtxt", folder / "configs" / "cpu.pbtxt"):
        config = text_format.Parse(path.read_text(), mc.ModelConfig())
        assert list(config.version_policy.specific.versions) == [1, 2], path


# --- routing: which variants follow the fallback -------------------------------------------------------------

def _experiment(*variants: tuple[str, str, str, int]) -> Experiment:
    return Experiment(salt="s", revision=7, variants=tuple(Variant(name=n, model_name=m, model_version=v, weight=w)
                                                          for n, m, v, w in variants))


def test_routing_moves_variants_on_the_old_champion_or_newest_and_nothing_else() -> None:
    experiment = _experiment(("control", "gru4rec", "3", 40), ("newest", "gru4rec", "", 20),
                             ("pinned_old", "gru4rec", "1", 10), ("other", "sasrec", "3", 20), ("pop", "popularity", "", 10))
    routed, moved = route_to_fallback(experiment, "gru4rec", old_version=3, new_version=2)
    assert moved == ["control", "newest"]
    assert [(v.name, v.model_name, v.model_version, v.weight) for v in routed.variants] == [
        ("control", "gru4rec", "2", 40), ("newest", "gru4rec", "2", 20), ("pinned_old", "gru4rec", "1", 10),
        ("other", "sasrec", "3", 20), ("pop", "popularity", "", 10)]
    # Same users in the same variants: salt, names, weights and mode unchanged.
    assert (routed.salt, routed.mode, routed.name) == (experiment.salt, experiment.mode, experiment.name)
    assert all(routed.assign(f"u{i}").name == experiment.assign(f"u{i}").name for i in range(500))


def test_routing_again_after_a_fallback_changes_nothing() -> None:
    once, _ = route_to_fallback(_experiment(("control", "gru4rec", "3", 100)), "gru4rec", 3, 2)
    again, moved = route_to_fallback(once, "gru4rec", 3, 2)
    assert moved == [] and again == once
    # Without a champion (no alias) only "newest" variants move.
    routed, moved = route_to_fallback(_experiment(("a", "gru4rec", "3", 50), ("b", "gru4rec", "", 50)), "gru4rec", None, 2)
    assert moved == ["b"] and routed.variants[0].model_version == "3"
    with pytest.raises(ValueError, match="start at 1"):
        route_to_fallback(once, "gru4rec", 3, 0)


def test_pins_and_the_load_override() -> None:
    assert pinned_versions([("gru4rec", "3"), ("gru4rec", ""), ("sasrec", "5"), ("gru4rec", "1")], "gru4rec") == {1, 3}
    config = {"name": "m", "version_policy": {"latest": {"num_versions": 2}}, "max_batch_size": 128}
    changed = with_version_served(config, ["3", 2], 1)
    assert changed["version_policy"] == {"specific": {"versions": [1, 2, 3]}}
    assert config["version_policy"] == {"latest": {"num_versions": 2}}  # the input is not changed


# --- the pipeline's champion ------------------------------------------------------------------------------

def test_the_pipeline_champion_is_the_registry_alias_and_today_s_rule_only_without_it() -> None:
    assert choose(2, "", [1, 2, 3]) == (2, REGISTRY_SOURCE)  # pinned champion 2 although 3 is newer
    version, source = choose(None, "the registry has no champion alias", [1, 2, 3])
    assert version is None and source == f"{NEWEST_READY} (the registry has no champion alias)"
    version, source = choose(7, "", [1, 2, 3])
    assert version is None and "Triton version 7, which is not in the model repository" in source


# --- the command's validation -------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["models", "fallback", "GRU4Rec"], "lower-case letters"),
    (["models", "fallback", "gru-4"], "lower-case letters"),
    (["models", "promote", "gru4rec", "v3"], "positive whole number"),
    (["models", "promote", "gru4rec", "0"], "positive whole number"),
])
def test_the_commands_refuse_malformed_names_and_versions(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_fallback_with_the_registry_away_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITRINE_REGISTRY__URL", "http://127.0.0.1:9")
    monkeypatch.setenv("VITRINE_REGISTRY__PROBE_TIMEOUT_S", "1")
    result = runner.invoke(app, ["models", "fallback", "gru4rec"])
    assert result.exit_code == 1 and "does not answer" in result.output and "127.0.0.1:9" in result.output, result.output


def test_a_promotion_stopped_half_way_is_finished_by_promoting_again() -> None:
    """Aliases are set one by one, `fallback` before `champion`: after a failure in between, promoting the intended
    version again gives the intended pair (what the fallback command's error tells the operator to run)."""
    for start, version in (({CHAMPION: "3", FALLBACK: "2"}, "2"), ({CHAMPION: "3", FALLBACK: "2"}, "4")):
        intended = {**start, **promotion_moves(start, version)}
        half = {**start, FALLBACK: intended[FALLBACK]}  # fallback moved, champion not yet
        assert {**half, **promotion_moves(half, version)} == intended


def test_aliases_are_set_fallback_first_and_champion_last() -> None:
    from vitrine.export.registry import Registry

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, str, str]] = []

        def set_registered_model_alias(self, model: str, alias: str, version: str) -> None:
            self.calls.append((model, alias, version))

    registry = object.__new__(Registry)  # no MLflow: only the order of the alias calls is under test
    registry.client = Recorder()  # type: ignore[assignment]
    registry._apply("m", {CHAMPION: "4", FALLBACK: "3"})
    assert registry.client.calls == [("m", FALLBACK, "3"), ("m", CHAMPION, "4")]


class FakeTriton:
    """Stands in for tritonclient's aio client in `ensure_ready`: which versions are ready, what a load does."""

    ready: set[int] = set()
    loads: list[dict | None] = []
    load_error: str | None = None
    load_makes_ready: bool = True

    def __init__(self, url: str) -> None:
        self.url = url

    async def is_model_ready(self, model: str, version: str) -> bool:
        return int(version) in FakeTriton.ready

    async def get_model_repository_index(self, as_json: bool = False) -> dict:
        return {"models": [{"name": "m", "version": str(v), "state": "READY"} for v in sorted(FakeTriton.ready)]}

    async def get_model_config(self, model: str, as_json: bool = False) -> dict:
        return {"config": {"name": model, "version_policy": {"latest": {"num_versions": 2}}}}

    async def load_model(self, model: str, config: str | None = None, client_timeout: float | None = None) -> None:
        from tritonclient.utils import InferenceServerException

        FakeTriton.loads.append(None if config is None else __import__("json").loads(config))
        if FakeTriton.load_error:
            raise InferenceServerException(FakeTriton.load_error)
        if config is not None and FakeTriton.load_makes_ready:
            FakeTriton.ready |= set(__import__("json").loads(config)["version_policy"]["specific"]["versions"])

    async def close(self) -> None:
        pass


@pytest.fixture
def fake_triton(monkeypatch: pytest.MonkeyPatch) -> type[FakeTriton]:
    import tritonclient.grpc.aio as triton

    FakeTriton.ready, FakeTriton.loads, FakeTriton.load_error, FakeTriton.load_makes_ready = {2, 3}, [], None, True
    monkeypatch.setattr(triton, "InferenceServerClient", FakeTriton)
    return FakeTriton


async def test_a_ready_fallback_is_not_reloaded(fake_triton: type[FakeTriton]) -> None:
    from vitrine.export.aliases import ensure_ready

    assert await ensure_ready("t:1", "m", 3) == "already ready" and fake_triton.loads == []


async def test_a_fallback_outside_the_policy_is_loaded_beside_the_ready_versions(fake_triton: type[FakeTriton]) -> None:
    from vitrine.export.aliases import ensure_ready

    how = await ensure_ready("t:1", "m", 1)
    assert how.startswith("loaded through the repository API") and fake_triton.ready == {1, 2, 3}
    assert fake_triton.loads == [{"name": "m", "version_policy": {"specific": {"versions": [1, 2, 3]}}}]


async def test_a_fallback_that_cannot_be_made_ready_is_a_clear_error(fake_triton: type[FakeTriton]) -> None:
    from vitrine.export.aliases import FallbackError, ensure_ready

    fake_triton.load_error = "failed to load 'm' version 1: folder not found"
    with pytest.raises(FallbackError, match="Triton could not load m version 1: failed to load"):
        await ensure_ready("t:1", "m", 1)
    fake_triton.load_error, fake_triton.load_makes_ready = None, False
    with pytest.raises(FallbackError, match="version 1 is not READY"):
        await ensure_ready("t:1", "m", 1)
