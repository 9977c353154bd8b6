"""Writes the Grafana dashboards of ektp-monitor (standard library only).

    python dashboards/build.py          # rewrite the three JSON files next to this script
    python dashboards/build.py --check  # exit 1 if a committed JSON file is out of date

The JSON files are committed so Grafana (provisioning or "Import dashboard") can use them without
Python; tests/test_dashboards.py fails when they differ from what this script builds. Every query
uses the metric names of collector/metrics.py (the metric contract). Titles and descriptions are
in Bahasa Indonesia, with the English technical term in brackets where it helps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 39
DS = {"type": "prometheus", "uid": "${datasource}"}

# Device kinds as the collector names them (collector/config.py DEVICE_NAMES), with their words.
DEVICES = (
    ("fingerprint", "Sidik jari (fingerprint)"),
    ("iris", "Iris mata (iris)"),
    ("camera", "Kamera (camera)"),
    ("signature_pad", "Alat tanda tangan (signature pad)"),
    ("card_reader", "Pembaca kartu (card reader)"),
    ("ups", "UPS"),
)

# Label selectors. The fleet overview filters by kabupaten and (several) kecamatan; the kit
# detail shows exactly one kit; collector health one or more collector instances.
FLEET = 'kabupaten=~"$kabupaten", kecamatan=~"$kecamatan"'
KIT = 'kabupaten="$kabupaten", kecamatan="$kecamatan", kit="$kit"'
COLLECTOR = 'job=~"$job", instance=~"$instance"'
BY_KIT = "kabupaten, kecamatan, kit"

# -- colours and value mappings -------------------------------------------------------------------


def mapping(*rows: tuple[str, str, str]) -> list[dict]:
    """Value mappings: (value, text, colour) rows."""
    return [{"type": "value", "options": {
        value: {"text": text, "color": color, "index": i} for i, (value, text, color) in enumerate(rows)}}]


READY = mapping(("0", "TIDAK SIAP", "red"), ("1", "SIAP", "green"))
READY3 = mapping(("0", "OFFLINE", "dark-red"), ("1", "TIDAK SIAP (online)", "orange"), ("2", "SIAP", "green"))
ONLINE = mapping(("0", "OFFLINE", "dark-red"), ("1", "ONLINE", "green"))
DEVICE_UP = mapping(("0", "RUSAK / TIDAK ADA", "red"), ("1", "OK", "green"))
POWER = mapping(("0", "Listrik PLN (mains)", "green"), ("1", "BATERAI (on battery)", "orange"),
                ("2", "BATERAI LEMAH (battery low)", "red"))
LINK = mapping(("0", "PUTUS (down)", "red"), ("1", "TERHUBUNG (up)", "green"))
CONNECTED = mapping(("0", "PUTUS", "red"), ("1", "TERHUBUNG", "green"))
DEVICE_NAME_MAPPING = [{"type": "value", "options": {
    name: {"text": words, "index": i} for i, (name, words) in enumerate(DEVICES)}}]


def steps(*pairs) -> dict:
    """Absolute thresholds: a base colour, then (value, colour) pairs."""
    base, *rest = pairs
    return {"mode": "absolute", "steps": [{"color": base, "value": None}] +
            [{"color": color, "value": value} for value, color in rest]}


GOOD = steps("green")
BAD_IF_ANY = steps("green", (1, "red"))
# -- panels ---------------------------------------------------------------------------------------


def target(expr: str, legend: str = "", *, ref: str = "A", instant: bool = False, table: bool = False) -> dict:
    doc = {"refId": ref, "datasource": DS, "editorMode": "code", "expr": expr,
           "legendFormat": legend or "__auto", "range": not instant, "instant": instant}
    if table:
        doc["format"] = "table"
    return doc


def targets(*specs) -> list[dict]:
    """Targets with refIds A, B, C...; each spec is (expr, legend) or a dict of target() options."""
    out = []
    for i, spec in enumerate(specs):
        if isinstance(spec, dict):
            out.append(target(ref=chr(ord("A") + i), **spec))
        else:
            expr, legend = spec
            out.append(target(expr, legend, ref=chr(ord("A") + i)))
    return out


def panel(kind: str, title: str, description: str, tgts: list[dict], *, unit: str, w: int, h: int,
          mappings: list | None = None, thresholds: dict | None = None, options: dict | None = None,
          custom: dict | None = None, overrides: list | None = None, color: dict | None = None,
          extra_defaults: dict | None = None, **extra) -> dict:
    defaults = {"unit": unit, "mappings": mappings or [], "thresholds": thresholds or GOOD,
                "color": color or {"mode": "thresholds" if kind in ("stat", "bargauge", "table") else "palette-classic"}}
    if custom:
        defaults["custom"] = custom
    defaults.update(extra_defaults or {})
    doc = {"type": kind, "title": title, "description": description, "datasource": DS, "targets": tgts,
           "fieldConfig": {"defaults": defaults, "overrides": overrides or []}, "options": options or {},
           "_size": (w, h)}
    doc.update(extra)
    return doc


def reduce_last() -> dict:
    return {"calcs": ["lastNotNull"], "fields": "", "values": False}


def stat(title, description, tgts, *, unit="none", w=6, h=4, color_mode="background", text_mode="auto", **kw):
    options = {"reduceOptions": reduce_last(), "colorMode": color_mode, "graphMode": "none",
               "justifyMode": "auto", "orientation": "auto", "textMode": text_mode, "wideLayout": True,
               "showPercentChange": False}
    return panel("stat", title, description, tgts, unit=unit, w=w, h=h, options=options, **kw)


def timeseries(title, description, tgts, *, unit, w=8, h=8, min_=None, max_=None, **kw):
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never", "spanNulls": False,
              "axisSoftMin": min_, "axisSoftMax": max_}
    custom = {k: v for k, v in custom.items() if v is not None}
    options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
               "tooltip": {"mode": "multi", "sort": "desc"}}
    return panel("timeseries", title, description, tgts, unit=unit, w=w, h=h, options=options, custom=custom, **kw)


def state_timeline(title, description, tgts, *, mappings, w=24, h=8, unit="none", **kw):
    options = {"mergeValues": True, "showValue": "auto", "alignValue": "left", "rowHeight": 0.9,
               "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
               "tooltip": {"mode": "single", "sort": "none"}}
    return panel("state-timeline", title, description, tgts, unit=unit, w=w, h=h, mappings=mappings,
                 options=options, custom={"fillOpacity": 80, "lineWidth": 0}, **kw)


def bargauge(title, description, tgts, *, unit="none", w=12, h=8, **kw):
    options = {"reduceOptions": reduce_last(), "orientation": "horizontal", "displayMode": "basic",
               "showUnfilled": True, "valueMode": "color", "namePlacement": "auto", "minVizHeight": 16,
               "minVizWidth": 8, "maxVizHeight": 300, "sizing": "auto"}
    return panel("bargauge", title, description, tgts, unit=unit, w=w, h=h, options=options, **kw)


def table(title, description, tgts, *, w=24, h=10, overrides=None, transformations=None, sort_by=None, **kw):
    options = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"], "fields": ""}}
    if sort_by:
        options["sortBy"] = sort_by
    return panel("table", title, description, tgts, unit="none", w=w, h=h, options=options,
                 custom={"align": "auto", "cellOptions": {"type": "auto"}, "inspect": False},
                 overrides=overrides, transformations=transformations or [], **kw)


def column(name: str, display: str, *, unit: str | None = None, mappings=None, background=False, row=False,
           width: int | None = None, links=None) -> dict:
    """A table field override: display name, unit, mappings, coloured cell (or whole row)."""
    props = [{"id": "displayName", "value": display}]
    if unit:
        props.append({"id": "unit", "value": unit})
    if mappings:
        props.append({"id": "mappings", "value": mappings})
    if background:
        cell = {"type": "color-background", "mode": "basic"}
        if row:
            cell["applyToRow"] = True
        props.append({"id": "custom.cellOptions", "value": cell})
    if width:
        props.append({"id": "custom.width", "value": width})
    if links:
        props.append({"id": "links", "value": links})
    return {"matcher": {"id": "byName", "options": name}, "properties": props}


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "_size": (24, 1)}


# -- layout ---------------------------------------------------------------------------------------


def layout(items: list[dict]) -> list[dict]:
    """Places panels left to right, wrapping at 24 columns; a row starts a new line."""
    out, x, y, line_h = [], 0, 0, 0
    for pid, item in enumerate(items, start=1):
        w, h = item.pop("_size")
        if item["type"] == "row" or x + w > 24:
            x, y, line_h = 0, y + line_h, 0
        item["id"] = pid
        item["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
        x += w
        line_h = max(line_h, h)
        if item["type"] == "row":
            x, y, line_h = 0, y + h, 0
        out.append(item)
    return out


# -- variables ------------------------------------------------------------------------------------

DATASOURCE_VAR = {"name": "datasource", "label": "Sumber data (datasource)", "type": "datasource",
                  "query": "prometheus", "current": {}, "hide": 0, "includeAll": False, "multi": False,
                  "options": [], "refresh": 1, "regex": "", "skipUrlSync": False}


def query_var(name: str, label: str, query: str, *, multi: bool = False, all_: bool = False,
              description: str = "") -> dict:
    doc = {"name": name, "label": label, "description": description, "type": "query", "datasource": DS,
           "definition": query, "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
           "current": {}, "hide": 0, "includeAll": all_, "multi": multi, "options": [], "refresh": 2,
           "regex": "", "skipUrlSync": False, "sort": 1}
    if all_:
        doc["allValue"] = ".*"
    return doc


def dashboard(uid: str, title: str, description: str, panels: list[dict], variables: list[dict], *,
              time_from: str = "now-24h") -> dict:
    return {
        "__comment": "Generated by dashboards/build.py; edit that script, not this file.",
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["ektp", "e-KTP"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "timezone": "browser",
        "refresh": "1m",
        "time": {"from": time_from, "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [{"type": "dashboards", "title": "Dasbor e-KTP", "tags": ["ektp"], "asDropdown": True,
                   "includeVars": True, "keepTime": True, "icon": "external link", "targetBlank": False,
                   "tooltip": "", "url": ""}],
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": [DATASOURCE_VAR, *variables]},
        "panels": layout(panels),
    }


# -- Fleet overview -------------------------------------------------------------------------------

KIT_DETAIL_LINK = [{
    "title": "Buka detail kit ${__data.fields.kecamatan} / ${__data.fields.kit}",
    "url": "/d/ektp-kit-detail?${datasource:queryparam}&var-kabupaten=${__data.fields.kabupaten}"
           "&var-kecamatan=${__data.fields.kecamatan}&var-kit=${__data.fields.kit}&${__url_time_range}",
}]


def online_only(expr: str, by: str = BY_KIT, selector: str = FLEET) -> str:
    """Keeps only the series of kits that are online: an offline kit's devices are unknown."""
    return f"({expr}) and on ({by}) (ektp_kit_online{{{selector}}} == 1)"


def fleet_overview() -> dict:
    f = FLEET
    status_targets = [
        {"expr": f"max by ({BY_KIT}) (ektp_kit_ready{{{f}}})", "instant": True, "table": True},
        {"expr": f"max by ({BY_KIT}) (ektp_kit_online{{{f}}})", "instant": True, "table": True},
        {"expr": f"max by ({BY_KIT}) (time() - ektp_kit_ready_change_timestamp_seconds{{{f}}})",
         "instant": True, "table": True},
        {"expr": f"max by ({BY_KIT}) (time() - ektp_kit_last_report_timestamp_seconds{{{f}}})",
         "instant": True, "table": True},
    ]
    for device, _ in DEVICES:
        up = "ektp_device_up{" + f + ', device="' + device + '"}'
        status_targets.append({"expr": f"max by ({BY_KIT}) ({online_only(up)})", "instant": True, "table": True})
    status_targets += [
        {"expr": f"max by ({BY_KIT}) (ektp_ups_on_battery{{{f}}} + ektp_ups_battery_low{{{f}}})",
         "instant": True, "table": True},
        {"expr": f"min by ({BY_KIT}) (ektp_link_up{{{f}}})", "instant": True, "table": True},
    ]
    refs = [chr(ord("A") + i) for i in range(len(status_targets))]
    columns = [
        column("kabupaten", "Kabupaten"),
        column("kecamatan", "Kecamatan"),
        column("kit", "Kit", links=KIT_DETAIL_LINK),
        column(f"Value #{refs[0]}", "Siap merekam (ready)", mappings=READY, background=True, row=True),
        column(f"Value #{refs[1]}", "Online", mappings=ONLINE, background=True),
        column(f"Value #{refs[2]}", "Status sejak (durasi)", unit="s"),
        column(f"Value #{refs[3]}", "Laporan terakhir (umur)", unit="s"),
    ]
    for i, (device, words) in enumerate(DEVICES):
        columns.append(column(f"Value #{refs[4 + i]}", words, mappings=DEVICE_UP, background=True))
    columns += [
        column(f"Value #{refs[10]}", "Listrik UPS (power)", mappings=POWER, background=True),
        column(f"Value #{refs[11]}", "Jaringan (link)", mappings=LINK, background=True),
    ]
    order = {"kabupaten": 0, "kecamatan": 1, "kit": 2}
    order.update({f"Value #{ref}": 3 + i for i, ref in enumerate(refs)})
    status_table = table(
        "Status kit per kecamatan",
        "Satu baris per kit. Baris merah: kit tidak siap merekam. Kolom perangkat: OK, atau RUSAK / TIDAK ADA "
        "(perangkat wajib yang tidak terdeteksi atau bermasalah); kosong bila perangkat itu tidak dipantau. "
        "Untuk kit offline kolom perangkat dikosongkan karena keadaannya tidak diketahui. 'Status sejak': "
        "berapa lama status siap/tidak siap ini sudah berlangsung. 'Laporan terakhir': umur laporan terakhir "
        "dari agen. Klik nama kit untuk membuka detail kit.",
        targets(*status_targets),
        overrides=columns,
        transformations=[
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {"excludeByName": {"Time": True}, "indexByName": order,
                                           "renameByName": {}}},
        ],
        sort_by=[{"displayName": "Siap merekam (ready)", "desc": False}],
        h=12,
    )

    down_table = table(
        "Perangkat rusak dan sejak kapan (devices down)",
        "Perangkat wajib atau terpasang yang tidak berfungsi pada kit yang sedang online, dan berapa lama sudah "
        "begitu (sejak perubahan status terakhir yang diterima kolektor).",
        targets(
            {"expr": f"max by ({BY_KIT}, device) ({online_only(f'ektp_device_up{{{f}}} == 0')})",
             "instant": True, "table": True},
            {"expr": f"max by ({BY_KIT}, device) ("
                     f"{online_only(f'(time() - ektp_device_state_change_timestamp_seconds{{{f}}}) and on ({BY_KIT}, device) (ektp_device_up{{{f}}} == 0)')})",
             "instant": True, "table": True},
        ),
        overrides=[
            column("kabupaten", "Kabupaten"),
            column("kecamatan", "Kecamatan"),
            column("kit", "Kit", links=KIT_DETAIL_LINK),
            column("device", "Perangkat (device)", mappings=DEVICE_NAME_MAPPING),
            column("Value #A", "Status", mappings=DEVICE_UP, background=True),
            column("Value #B", "Rusak selama (durasi)", unit="s"),
        ],
        transformations=[
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": {},
                                           "indexByName": {"kabupaten": 0, "kecamatan": 1, "kit": 2, "device": 3,
                                                           "Value #A": 4, "Value #B": 5}}},
        ],
        sort_by=[{"displayName": "Rusak selama (durasi)", "desc": True}],
        w=14, h=9,
    )

    panels = [
        row("Hari ini: kecamatan mana yang bisa merekam? (today)"),
        stat("Kecamatan yang bisa merekam",
             "Jumlah kecamatan dengan sedikitnya satu kit siap merekam (ready), dibanding semua kecamatan yang "
             "punya kit di inventaris.",
             targets((f"sum(max by (kabupaten, kecamatan) (ektp_kit_ready{{{f}}}))", "bisa merekam"),
                     (f"count(max by (kabupaten, kecamatan) (ektp_kit_info{{{f}}}))", "semua kecamatan")),
             w=6, color_mode="value"),
        stat("Kit siap (ready)",
             "Kit yang online dan semua perangkat wajibnya berfungsi: bisa merekam sekarang.",
             targets((f"sum(ektp_kit_ready{{{f}}})", "siap")), w=4),
        stat("Kit tidak siap (online, not ready)",
             "Kit yang online tetapi sedikitnya satu perangkat wajib rusak atau tidak terdeteksi.",
             targets((f"sum(ektp_kit_online{{{f}}}) - sum(ektp_kit_ready{{{f}}})", "tidak siap")),
             w=5, thresholds=steps("green", (1, "orange"))),
        stat("Kit offline",
             "Kit yang tidak melapor: agen mati, komputer mati, atau jaringan putus. Termasuk kit di inventaris "
             "yang belum pernah melapor.",
             targets((f"sum(1 - ektp_kit_online{{{f}}})", "offline")), w=5, thresholds=BAD_IF_ANY),
        stat("Kit memakai baterai UPS (on battery)",
             "Kit yang UPS-nya sekarang berjalan dengan baterai karena listrik PLN padam.",
             targets((f"sum(ektp_ups_on_battery{{{f}}})", "baterai")), w=4,
             thresholds=steps("green", (1, "orange"))),
        row("Status per kit (status per kit)"),
        status_table,
        row("Perangkat rusak (devices down)"),
        down_table,
        bargauge("Perangkat rusak menurut jenis (failing devices by kind)",
                 "Jumlah kit online yang perangkat jenis ini rusak atau tidak terdeteksi. 0: tidak ada yang rusak.",
                 targets({"expr": f"sum by (device) ({online_only(f'1 - ektp_device_up{{{f}}}')})",
                          "legend": "{{device}}", "instant": True}),
                 w=10, h=9, thresholds=BAD_IF_ANY),
        row("Listrik dan jaringan (power and link)"),
        stat("Sumber listrik kit (UPS)",
             "Per kit yang UPS-nya dipantau: listrik PLN, baterai (PLN padam), atau baterai lemah (segera mati).",
             targets({"expr": f"max by ({BY_KIT}) (ektp_ups_on_battery{{{f}}} + ektp_ups_battery_low{{{f}}})",
                      "legend": "{{kecamatan}} / {{kit}}", "instant": True}),
             w=8, h=8, mappings=POWER, thresholds=steps("green", (1, "orange"), (2, "red"))),
        timeseries("Waktu tempuh jaringan (round-trip time, RTT)",
                   "Waktu tempuh pemeriksaan jaringan terakhir yang dijawab, per kit dan tujuan (target).",
                   targets((f"max by (kecamatan, kit, target) (ektp_link_rtt_seconds{{{f}}})",
                            "{{kecamatan}} / {{kit}} → {{target}}")),
                   unit="s", w=8, min_=0),
        timeseries("Rasio dijawab (answered / sent)",
                   "Bagian pemeriksaan jaringan yang dijawab tujuan (1 = semua dijawab, 0 = putus). "
                   "Kebalikan dari packet loss.",
                   targets((f"sum by (kecamatan, kit, target) (rate(ektp_link_probes_received_total{{{f}}}[$__rate_interval]))"
                            f" / sum by (kecamatan, kit, target) (rate(ektp_link_probes_sent_total{{{f}}}[$__rate_interval]))",
                            "{{kecamatan}} / {{kit}} → {{target}}")),
                   unit="percentunit", w=8, min_=0, max_=1),
        row("Riwayat (history)"),
        state_timeline("Riwayat kesiapan kit (readiness history)",
                       "Status tiap kit sepanjang rentang waktu yang dipilih: SIAP, TIDAK SIAP (online tetapi ada "
                       "perangkat wajib rusak) atau OFFLINE.",
                       targets((f"max by (kecamatan, kit) (ektp_kit_ready{{{f}}} + ektp_kit_online{{{f}}})",
                                "{{kecamatan}} / {{kit}}")),
                       mappings=READY3, h=10),
        row("Peta (map)"),
        panel("geomap", "Peta kecamatan: kit siap merekam (map)",
              "Setiap kecamatan yang punya koordinat di inventaris collector; angka = jumlah kit yang siap "
              "merekam (0 = tidak bisa merekam). Tanpa koordinat di inventaris, peta ini kosong.",
              [target(f'ektp_kecamatan_location_info{{kabupaten=~"$kabupaten"}} * on (kabupaten, kecamatan) '
                      f'group_left () sum by (kabupaten, kecamatan) (ektp_kit_ready{{{f}}})',
                      "{{name}}", instant=True, table=True)],
              unit="none", w=24, h=12, thresholds=steps("red", (1, "green")),
              color={"mode": "thresholds"},
              options={"view": {"id": "coords", "lat": 0.0, "lon": 111.8, "zoom": 7},
                       "controls": {"showZoom": True, "mouseWheelZoom": True},
                       "layers": [{"type": "markers", "name": "Kecamatan",
                                   "location": {"mode": "coords", "latitude": "latitude", "longitude": "longitude"},
                                   "config": {"showLegend": True,
                                              "style": {"color": {"field": "Value"}, "size": {"fixed": 8},
                                                        "text": {"field": "name", "mode": "field"}}}}]},
              transformations=[{"id": "convertFieldType", "options": {"conversions": [
                  {"targetField": "latitude", "destinationType": "number"},
                  {"targetField": "longitude", "destinationType": "number"}]}}]),
    ]
    return dashboard(
        "ektp-fleet-overview", "e-KTP: Ringkasan kit perekaman (fleet overview)",
        "Kecamatan mana yang bisa merekam hari ini, apa yang rusak di mana dan sejak kapan.",
        panels,
        [query_var("kabupaten", "Kabupaten/Kota", "label_values(ektp_kit_info, kabupaten)", multi=True, all_=True),
         query_var("kecamatan", "Kecamatan", 'label_values(ektp_kit_info{kabupaten=~"$kabupaten"}, kecamatan)',
                   multi=True, all_=True)],
    )


# -- Kit detail -----------------------------------------------------------------------------------


def kit_detail() -> dict:
    k = KIT
    rate = "[$__rate_interval]"
    panels = [
        row("Ringkasan kit (summary)"),
        stat("Status kit", "SIAP: online dan semua perangkat wajib berfungsi. TIDAK SIAP: online tetapi ada "
                           "perangkat wajib rusak. OFFLINE: tidak melapor.",
             targets((f"max(ektp_kit_ready{{{k}}} + ektp_kit_online{{{k}}})", "status")),
             w=4, mappings=READY3, thresholds=steps("dark-red", (1, "orange"), (2, "green"))),
        stat("Status berubah (since)", "Kapan status siap/tidak siap kit ini terakhir berubah.",
             targets((f"max(ektp_kit_ready_change_timestamp_seconds{{{k}}}) * 1000", "berubah")),
             unit="dateTimeFromNow", w=4, color_mode="none"),
        stat("Laporan terakhir (last report)", "Kapan kolektor terakhir menerima laporan dari agen kit ini.",
             targets((f"max(ektp_kit_last_report_timestamp_seconds{{{k}}}) * 1000", "laporan")),
             unit="dateTimeFromNow", w=4, color_mode="none"),
        stat("Antrean laporan agen (queue)",
             "Laporan yang menunggu di antrean simpan-dan-teruskan (store-and-forward) agen karena broker belum "
             "mengonfirmasi. Naik terus: jaringan ke kabupaten putus.",
             targets((f"max(ektp_agent_queued_reports{{{k}}})", "antrean")),
             w=4, thresholds=steps("green", (10, "orange"), (1000, "red"))),
        stat("Laporan dibuang (dropped)",
             "Laporan yang dibuang agen karena antreannya penuh, sejak agen dinyalakan. Lebih dari 0: ada riwayat "
             "yang hilang.",
             targets((f"max(ektp_agent_dropped_reports_total{{{k}}})", "dibuang")), w=4, thresholds=BAD_IF_ANY),
        stat("Agen dan komputer (agent)", "Versi agen, sistem operasi dan nama komputer kit.",
             targets({"expr": f"max by (agent_version, os, hostname) (ektp_kit_info{{{k}}})",
                      "legend": "agen {{agent_version}} · {{os}} · {{hostname}}", "instant": True}),
             w=4, color_mode="none", text_mode="name"),
        row("Perangkat (devices)"),
        state_timeline("Status perangkat (device states)",
                       "OK atau RUSAK / TIDAK ADA per perangkat sepanjang rentang waktu.",
                       targets((f"max by (device) (ektp_device_up{{{k}}})", "{{device}}")),
                       mappings=DEVICE_UP, w=16, h=8),
        bargauge("Lama rusak (time broken)",
                 "Berapa lama tiap perangkat yang rusak atau tidak terdeteksi sudah begitu (sejak perubahan status "
                 "terakhir); 0 untuk perangkat yang berfungsi.",
                 targets({"expr": f"max by (device) (time() - ektp_device_state_change_timestamp_seconds{{{k}}}) or "
                                  f"max by (device) (ektp_device_up{{{k}}} == 1) * 0",
                          "legend": "{{device}}", "instant": True}),
                 unit="s", w=8, h=8, thresholds=steps("green", (1, "red"))),
        row("UPS"),
        stat("Sumber listrik (power)", "Listrik PLN, baterai (PLN padam) atau baterai lemah.",
             targets((f"max(ektp_ups_on_battery{{{k}}} + ektp_ups_battery_low{{{k}}})", "listrik")),
             w=4, h=8, mappings=POWER, thresholds=steps("green", (1, "orange"), (2, "red"))),
        timeseries("Tegangan listrik PLN (input voltage)",
                   "Tegangan masuk dari PLN ke UPS; 0 saat PLN padam, rendah saat tegangan turun (brownout).",
                   targets((f"max(ektp_ups_input_voltage_volts{{{k}}})", "masuk (input)")),
                   unit="volt", w=10),
        timeseries("Muatan baterai UPS (battery charge)",
                   "Perkiraan muatan baterai UPS (pada Megatec diperkirakan dari tegangan baterai: anggap kasar).",
                   targets((f"max(ektp_ups_battery_charge_ratio{{{k}}})", "muatan (charge)")),
                   unit="percentunit", w=10, min_=0, max_=1),
        row("Jaringan (link)"),
        timeseries("Waktu tempuh (round-trip time, RTT)", "Waktu tempuh pemeriksaan terakhir yang dijawab, per tujuan.",
                   targets((f"max by (target) (ektp_link_rtt_seconds{{{k}}})", "{{target}}")), unit="s", w=8, min_=0),
        timeseries("Kehilangan paket (loss)",
                   "Bagian pemeriksaan jaringan yang tidak dijawab (0 = semua dijawab, 1 = putus).",
                   targets((f"1 - (sum by (target) (rate(ektp_link_probes_received_total{{{k}}}{rate}))"
                            f" / sum by (target) (rate(ektp_link_probes_sent_total{{{k}}}{rate})))", "{{target}}")),
                   unit="percentunit", w=8, min_=0, max_=1),
        state_timeline("Status jaringan dan antarmuka (link, interface)",
                       "Tujuan menjawab (TERHUBUNG) atau tidak (PUTUS), dan antarmuka jaringan yang wajib menyala.",
                       targets((f"max by (target) (ektp_link_up{{{k}}})", "tujuan {{target}}"),
                               (f"max by (interface) (ektp_link_interface_up{{{k}}})", "antarmuka {{interface}}")),
                       mappings=LINK, w=8),
        row("Komputer perekaman (host)"),
        timeseries("Ruang disk kosong (disk free)", "Ruang kosong per disk (mount).",
                   targets((f"max by (mount) (ektp_host_disk_free_bytes{{{k}}})", "kosong {{mount}}")),
                   unit="bytes", w=12, min_=0),
        timeseries("Selisih jam komputer (clock skew)",
                   "Detik jam komputer lebih cepat (+) atau lebih lambat (-) dari server acuan. Jam yang salah "
                   "mengacaukan waktu rekaman.",
                   targets((f"max(ektp_host_clock_skew_seconds{{{k}}})", "selisih")), unit="s", w=12),
        timeseries("Antrean dan laporan dibuang (queue, dropped)",
                   "Laporan di antrean agen, dan laporan yang dibuang karena antrean penuh dalam tiap selang.",
                   targets((f"max(ektp_agent_queued_reports{{{k}}})", "antrean (queued)"),
                           (f"max(increase(ektp_agent_dropped_reports_total{{{k}}}{rate}))", "dibuang (dropped)")),
                   unit="none", w=12, min_=0),
        timeseries("Laporan diterima per menit (reports)",
                   "Laporan yang diterima kolektor dari kit ini (yang ganda tidak dihitung).",
                   targets((f"sum(rate(ektp_kit_reports_received_total{{{k}}}{rate})) * 60", "diterima")),
                   unit="cpm", w=12, min_=0),
    ]
    return dashboard(
        "ektp-kit-detail", "e-KTP: Detail kit (kit detail)",
        "Satu kit perekaman: perangkat, UPS, jaringan, komputer dan agen.",
        panels,
        [query_var("kabupaten", "Kabupaten/Kota", "label_values(ektp_kit_info, kabupaten)"),
         query_var("kecamatan", "Kecamatan", 'label_values(ektp_kit_info{kabupaten="$kabupaten"}, kecamatan)'),
         query_var("kit", "Kit", 'label_values(ektp_kit_info{kabupaten="$kabupaten", kecamatan="$kecamatan"}, kit)')],
    )


# -- Collector health -----------------------------------------------------------------------------


def collector_health() -> dict:
    c = COLLECTOR
    rate = "[$__rate_interval]"
    state_colors = [{"matcher": {"id": "byName", "options": name},
                     "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": color}}]}
                    for name, color in (("ready", "green"), ("not_ready", "orange"), ("offline", "red"))]
    panels = [
        row("Koneksi (connection)"),
        stat("Kolektor terhubung ke broker MQTT", "TERHUBUNG bila kolektor tersambung ke broker MQTT.",
             targets(({"expr": f"ektp_collector_mqtt_connected{{{c}}}", "legend": "{{instance}}"})),
             w=6, mappings=CONNECTED, thresholds=steps("red", (1, "green"))),
        stat("Prometheus membaca kolektor (scrape up)", "TERHUBUNG bila scrape terakhir oleh Prometheus berhasil.",
             targets(({"expr": f"up{{{c}}}", "legend": "{{instance}}"})),
             w=6, mappings=CONNECTED, thresholds=steps("red", (1, "green"))),
        stat("Pesan menunggu diproses (inbox)",
             "Pesan yang sudah diterima dari broker tetapi belum diproses. Naik terus: kolektor kewalahan.",
             targets((f"sum(ektp_collector_inbox_messages{{{c}}})", "inbox")),
             w=4, thresholds=steps("green", (100, "orange"), (10000, "red"))),
        bargauge("Kit menurut status (kits by state)",
                 "ready: siap merekam; not_ready: online tetapi ada perangkat wajib rusak; offline: tidak melapor.",
                 targets({"expr": f"sum by (state) (ektp_collector_kits{{{c}}})", "legend": "{{state}}",
                          "instant": True}),
                 w=8, h=4, overrides=state_colors),
        row("Pesan MQTT (messages)"),
        timeseries("Pesan diterima per detik (received)", "Pesan MQTT dari kit yang diterima kolektor.",
                   targets((f"sum by (instance) (rate(ektp_collector_messages_received_total{{{c}}}{rate}))",
                            "{{instance}}")),
                   unit="cps", w=12, min_=0),
        timeseries("Pesan ditolak per detik menurut alasan (refused by reason)",
                   "Pesan yang ditolak: malformed (rusak), version (versi protokol lain), identity (topik tidak "
                   "cocok dengan isi), topic, clock (jam kit terlalu jauh), unknown_kit, capacity.",
                   targets((f"sum by (reason) (rate(ektp_collector_messages_refused_total{{{c}}}{rate}))",
                            "{{reason}}")),
                   unit="cps", w=12, min_=0),
        bargauge("Pesan ditolak dalam rentang waktu (refused, total)",
                 "Jumlah pesan ditolak per alasan dalam rentang waktu yang dipilih.",
                 targets({"expr": f"sum by (reason) (increase(ektp_collector_messages_refused_total{{{c}}}[$__range]))",
                          "legend": "{{reason}}", "instant": True}),
                 w=8, thresholds=BAD_IF_ANY),
        timeseries("Antrean inbox kolektor (inbox)", "Pesan yang menunggu diproses, sepanjang waktu.",
                   targets((f"ektp_collector_inbox_messages{{{c}}}", "{{instance}}")), unit="none", w=8, min_=0),
        timeseries("Kit menurut status (kits by state, history)", "Jumlah kit siap, tidak siap dan offline.",
                   targets((f"sum by (state) (ektp_collector_kits{{{c}}})", "{{state}}")),
                   unit="none", w=8, min_=0, overrides=state_colors),
        row("Scrape Prometheus"),
        timeseries("Durasi scrape (scrape duration)", "Waktu yang dibutuhkan kolektor untuk menjawab /metrics.",
                   targets((f"scrape_duration_seconds{{{c}}}", "{{instance}}")), unit="s", w=12, min_=0),
        timeseries("Sampel per scrape (samples scraped)", "Jumlah sampel yang dibaca Prometheus tiap scrape.",
                   targets((f"scrape_samples_scraped{{{c}}}", "{{instance}}")), unit="none", w=12, min_=0),
    ]
    return dashboard(
        "ektp-collector-health", "e-KTP: Kesehatan kolektor (collector health)",
        "Apakah kolektor menerima pesan kit, tersambung ke broker MQTT, dan dibaca Prometheus.",
        panels,
        [query_var("job", "Job Prometheus", "label_values(ektp_collector_mqtt_connected, job)", multi=True, all_=True),
         query_var("instance", "Kolektor (instance)",
                   'label_values(ektp_collector_mqtt_connected{job=~"$job"}, instance)', multi=True, all_=True)],
        time_from="now-6h",
    )


DASHBOARDS = {
    "fleet-overview.json": fleet_overview,
    "kit-detail.json": kit_detail,
    "collector-health.json": collector_health,
}


def render(doc: dict) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def build() -> dict[str, str]:
    """File name -> JSON text, as the committed files must read."""
    return {name: render(make()) for name, make in DASHBOARDS.items()}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, text in build().items():
        path = HERE / name
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run: python dashboards/build.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
