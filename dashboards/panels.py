"""Panels as small declarative specs, turned into Grafana JSON by grafana-foundation-sdk.

A dashboard module lists rows of `Panel` specs; `build_dashboard` turns them into the SDK's
builders and the SDK into JSON. Keeping the specs (not only the JSON) lets the tests ask the
generator what a target needs from the kernel (`Query.needs`): a per-order latency panel is
empty on a kernel without function probes, and the live tests must know that from the spec,
never guess it from an empty answer.

Conventions (dashboard-linter's rules, asserted by tests/service/test_dashboards_lint.py):
every panel reads `${datasource}`, every selector carries `job=~"$job",instance=~"$instance"`,
every counter sits inside rate()/increase() over `$__rate_interval` (or `$__range` for
totals), and every panel has a unit and a description.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from grafana_foundation_sdk.builders import bargauge, common, dashboard, heatmap, prometheus, stat, table
from grafana_foundation_sdk.builders import timeseries as ts
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm
from grafana_foundation_sdk.models import prometheus as pm

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
MATCH = 'job=~"$job",instance=~"$instance"'
# Resolution of range queries: $__interval is range / MAX_POINTS (rounded as Grafana rounds),
# never below the data source's timeInterval (the scrape interval).
MAX_POINTS = 500
HEATMAP_POINTS = 120

# What a query needs from the kernel, beyond tracepoints. The live tests turn each into a
# question for the daemon's khmon_feature_enabled / khmon_kernel_info or for sysfs.
FUNCTION_PROBES = "feature:function_probes"  # kfunc or kprobe on collapse_huge_page
PMD_RECORDS = "feature:pmd_records"  # per-PMD records (function probes), which waste needs
ORDER_FIELD = "kernel:order_field"  # the mTHP collapse series' order field on the tracepoints
MTHP_SIZES = "sysfs:mthp_sizes"  # transparent_hugepage/hugepages-<size>/ (Linux 6.8 and later)


def mthp_stat(stat_name: str) -> str:
    """A per-size counter, hugepages-<size>/stats/<stat_name>, that not every kernel has."""
    return f"mthp_stat:{stat_name}"


NEEDS_TEXT = {
    FUNCTION_PROBES: "Needs function probes (kfunc or kprobe on collapse_huge_page): empty where "
                     "the kernel refuses them (khmon doctor says why).",
    PMD_RECORDS: "Needs per-PMD records, which come from function probes: empty where the kernel "
                 "refuses them (khmon doctor says why).",
    ORDER_FIELD: "Needs the order field of the mTHP collapse series (Linux 7.2): older kernels "
                 "collapse whole PMDs only.",
    MTHP_SIZES: "Needs mTHP sizes (transparent_hugepage/hugepages-<size>/, Linux 6.8 and later).",
}


def needs_text(needs: str) -> str:
    """The sentence a panel description ends with, saying what an empty panel means."""
    if needs.startswith("mthp_stat:"):
        stat_name = needs.partition(":")[2]
        return (f"Needs the kernel's per-size counter hugepages-<size>/stats/{stat_name}: absent "
                "(not zero) on kernels without it.")
    return NEEDS_TEXT[needs]


def sel(metric: str, *matchers: str) -> str:
    """A selector carrying the dashboard's job and instance matchers, then `matchers`."""
    return f"{metric}{{{','.join((MATCH, *matchers))}}}"


def rate(metric: str, *matchers: str) -> str:
    """Per-second rate of a counter over $__rate_interval (at least four scrapes)."""
    return f"rate({sel(metric, *matchers)}[$__rate_interval])"


def increase(metric: str, *matchers: str) -> str:
    """A counter's increase over the dashboard's whole time range."""
    return f"increase({sel(metric, *matchers)}[$__range])"


@dataclass(frozen=True)
class Query:
    """One panel target. `instant` for stats and tables read at the end of the range."""

    expr: str
    legend: str = "__auto"
    instant: bool = False
    fmt: Literal["time_series", "table", "heatmap"] = "time_series"
    needs: str | None = None


Kind = Literal["timeseries", "stat", "table", "heatmap", "bargauge"]


@dataclass(frozen=True)
class Panel:
    """One panel. `needs` applies to every query that names none of its own."""

    kind: Kind
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    w: int = 8
    h: int = 8
    needs: str | None = None
    mappings: dict[str, tuple[str, str]] = field(default_factory=dict)  # value -> (text, color)
    text_mode: Literal["auto", "value", "name", "value_and_name"] = "auto"
    thresholds: tuple[tuple[float | None, str], ...] = ((None, "green"),)
    stack: bool = False
    min: float | None = None
    merge: bool = False  # tables: join the queries' frames on their labels
    # A merged table's value columns, by refId: (header, unit). Grafana names the column of
    # query X "Value #X" after the merge, which is what the override matches.
    columns: dict[str, tuple[str, str]] = field(default_factory=dict)

    def query_needs(self, q: Query) -> str | None:
        return q.needs or self.needs

    def full_description(self) -> str:
        needs = sorted({n for q in self.queries if (n := self.query_needs(q))})
        return " ".join([self.description, *(needs_text(n) for n in needs)])


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]
    repeat: str | None = None  # a variable name: one copy of the row per selected value


def _target(q: Query, ref: str) -> prometheus.Dataquery:
    t = (prometheus.Dataquery().expr(q.expr).legend_format(q.legend).ref_id(ref)
         .datasource(DATASOURCE).editor_mode(pm.QueryEditorMode.CODE)
         .format(pm.PromQueryFormat(q.fmt)))
    return t.instant() if q.instant else t.range()


def _thresholds(p: Panel) -> dashboard.ThresholdsConfig:
    steps = [dm.Threshold(value=v, color=c) for v, c in p.thresholds]
    return dashboard.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(steps)


def _mappings(p: Panel) -> list[dm.ValueMapping]:
    if not p.mappings:
        return []
    return [dm.ValueMap(options={
        value: dm.ValueMappingResult(text=text, color=color, index=i)
        for i, (value, (text, color)) in enumerate(p.mappings.items())})]


def _builder(p: Panel, panel_id: int) -> Any:
    """The SDK builder for one spec. Every kind gets the same common settings first."""
    kinds: dict[Kind, Any] = {"timeseries": ts.Panel, "stat": stat.Panel, "table": table.Panel,
                              "heatmap": heatmap.Panel, "bargauge": bargauge.Panel}
    b = (kinds[p.kind]().id(panel_id).title(p.title).description(p.full_description())
         .datasource(DATASOURCE).unit(p.unit).span(p.w).height(p.h).thresholds(_thresholds(p)))
    for i, q in enumerate(p.queries):
        b = b.with_target(_target(q, chr(ord("A") + i)))
    if p.mappings:
        b = b.mappings(_mappings(p))
    if p.min is not None:
        b = b.min(p.min)
    for ref, (name, unit) in p.columns.items():
        b = b.override_by_name(f"Value #{ref}", [dm.DynamicConfigValue(id_val="displayName", value=name),
                                                 dm.DynamicConfigValue(id_val="unit", value=unit)])
    if p.kind == "timeseries":
        b = (b.max_data_points(MAX_POINTS).fill_opacity(10).line_width(1).show_points(cm.VisibilityMode.NEVER)
             .legend(common.VizLegendOptions().display_mode(cm.LegendDisplayMode.TABLE)
                     .placement(cm.LegendPlacement.BOTTOM).show_legend(True).calcs(["mean", "max"]))
             .tooltip(common.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)))
        if p.stack:
            b = b.stacking(common.StackingConfig().mode(cm.StackingMode.NORMAL))
    elif p.kind == "stat":
        b = (b.reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
             .graph_mode(cm.BigValueGraphMode.NONE).color_mode(cm.BigValueColorMode.VALUE)
             .text_mode(cm.BigValueTextMode(p.text_mode)))
    elif p.kind == "bargauge":
        b = (b.reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
             .orientation(cm.VizOrientation.HORIZONTAL).display_mode(cm.BarGaugeDisplayMode.BASIC)
             .show_unfilled(True).min_viz_height(16))
    elif p.kind == "heatmap":
        b = (b.max_data_points(HEATMAP_POINTS).calculate(False)
             .y_axis(heatmap.YAxisConfig().unit(p.unit))
             .cell_values(heatmap.CellValues().unit("ops"))
             .color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME).scheme("Oranges")
                    .scale(hm.HeatmapColorScale.EXPONENTIAL).exponent(0.5).steps(64).fill("dark-orange"))
             .rows_frame(heatmap.RowsHeatmapOptions().layout(cm.HeatmapCellLayout.LE)))
    elif p.kind == "table" and p.merge:
        b = b.with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
    return b


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    annotations: tuple[dict[str, Any], ...] = ()
    tags: tuple[str, ...] = ("khmon",)

    def panels(self) -> list[Panel]:
        return [p for r in self.rows for p in r.panels]


def variables(ds_label: str = "Data source") -> list[Any]:
    """datasource, job and instance, as dashboard-linter's template rules want them: job and
    instance from khmon_build_info (one series per daemon), multi-select, All as `.+`, and
    refreshed when the time range changes (a daemon started later shows up)."""
    refresh = dm.VariableRefresh.ON_TIME_RANGE_CHANGED
    out: list[Any] = [dashboard.DatasourceVariable("datasource").label(ds_label).type("prometheus")]
    for name, query in (("job", "label_values(khmon_build_info, job)"),
                        ("instance", 'label_values(khmon_build_info{job=~"$job"}, instance)')):
        out.append(dashboard.QueryVariable(name).label(name.title()).datasource(DATASOURCE).query(query)
                   .multi(True).include_all(True).all_value(".+").refresh(refresh)
                   .sort(dm.VariableSort.ALPHABETICAL_ASC)
                   .description(f"The {name} label of khmon's scrape targets (from khmon_build_info)."))
    return out


def prometheus_annotation(name: str, expr: str, title: str, text: str, color: str) -> dict[str, Any]:
    """A Prometheus annotation in the shape Grafana 11 saves: the query in `target` (where
    Grafana's Prometheus data source runs it from), how to render hits at the top level.
    Written as JSON: the SDK's AnnotationQuery has no field for the Prometheus query itself."""
    return {
        "name": name, "enable": True, "hide": False, "iconColor": color, "datasource": {
            "type": DATASOURCE.type_val, "uid": DATASOURCE.uid},
        "target": {"refId": "Anno", "expr": expr, "interval": "", "datasource": {
            "type": DATASOURCE.type_val, "uid": DATASOURCE.uid}},
        "titleFormat": title, "textFormat": text, "tagKeys": "instance", "useValueForTime": False,
    }


def build_dashboard(d: Dashboard) -> dict[str, Any]:
    """The dashboard's JSON model, as a plain dict, in the SDK's key order."""
    b = (dashboard.Dashboard(d.title).uid(d.uid).description(d.description).tags(list(d.tags))
         .readonly().tooltip(dm.DashboardCursorSync.CROSSHAIR).time("now-1h", "now").refresh("30s")
         .timezone("browser").variables(variables()))
    panel_id = 1
    for r in d.rows:
        row = dashboard.Row(r.title).id(panel_id)
        if r.repeat:
            row = row.repeat(r.repeat)
        b = b.with_row(row)
        panel_id += 1
        for p in r.panels:
            b = b.with_panel(_builder(p, panel_id))
            panel_id += 1
    doc: dict[str, Any] = json.loads(json.dumps(b.build(), cls=JSONEncoder))
    if d.annotations:
        doc["annotations"] = {"list": [builtin_annotation(), *d.annotations]}
    else:
        doc["annotations"] = {"list": [builtin_annotation()]}
    return doc


def builtin_annotation() -> dict[str, Any]:
    """Grafana's own annotations (alerts and manual notes), which every dashboard carries."""
    return {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
            "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
            "type": "dashboard"}


def targets(d: Dashboard) -> list[tuple[int, str, Panel, Query]]:
    """(panel id, refId, spec, query) for every target, with the ids build_dashboard gives."""
    out = []
    panel_id = 1
    for r in d.rows:
        panel_id += 1
        for p in r.panels:
            out.extend((panel_id, chr(ord("A") + i), p, q) for i, q in enumerate(p.queries))
            panel_id += 1
    return out
