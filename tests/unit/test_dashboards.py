"""Dashboard JSON and provisioning, without Grafana: well-formed, current, one datasource."""

import json
import runpy

import yaml

from vitrine.settings import REPO_ROOT

GRAFANA = REPO_ROOT / "grafana"


def _build() -> dict:
    return runpy.run_path(str(GRAFANA / "build.py"))


def test_committed_dashboards_are_what_build_py_writes() -> None:
    rendered = _build()["render_all"]()
    committed = {p.name: p.read_text() for p in (GRAFANA / "dashboards").glob("*.json")}
    assert committed == rendered


def test_panels_have_unique_ids_descriptions_units_and_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "vitrine.yml").read_text())["datasources"]
    uids = {d["uid"] for d in provisioned}
    for path in (GRAFANA / "dashboards").glob("*.json"):
        dashboard = json.loads(path.read_text())
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in dashboard["panels"]:
            if panel["type"] == "text":
                continue
            assert panel["datasource"]["uid"] in uids and panel["description"], (path.name, panel["title"])
            assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
            assert all(t["datasource"]["uid"] in uids and t["expr"] for t in panel["targets"]), panel["title"]
        for variable in dashboard["templating"]["list"]:
            assert variable["datasource"]["uid"] in uids
            used = any(f"${variable['name']}" in t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
            assert used, f"{path.name}: template variable {variable['name']} is not used"


def test_dashboard_provider_points_at_a_folder() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "vitrine.yml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]
