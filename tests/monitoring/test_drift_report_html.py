"""The HTML drift report: streamed by RenderDriftReport, self-contained, with a reference vs
current plot per column, and rendered by headless Chromium into a screenshot that shows
the plots (pixels in both plot colours)."""

from __future__ import annotations

import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from falaj.monitoring.v1 import request_response_pb2 as rr
from falaj_platform.services.monitoring.report_html import CURRENT_COLOR, REFERENCE_COLOR
from tests.monitoring.conftest import MonitoringClient, log_table

CHROMIUM = Path("/usr/bin/chromium")


def _render(monitoring: MonitoringClient) -> tuple[bytes, str]:
    monitoring.upload_profile()
    monitoring.create_monitor(window_rows=500)
    monitoring.ingest(log_table(500, shift=0.8))
    [report] = monitoring.reports()
    chunks = list(monitoring.RenderDriftReport(rr.RenderDriftReportRequest(name=report.name)))
    return b"".join(c.data for c in chunks), chunks[0].content_type


def test_report_is_one_self_contained_page_with_a_plot_per_column(monitoring: MonitoringClient) -> None:
    page, content_type = _render(monitoring)
    html = page.decode("utf-8")
    assert content_type == "text/html; charset=utf-8"
    assert html.startswith("<!DOCTYPE html>") and "DETECTED" in html
    assert html.count("<svg") == 6  # four features and two prediction columns
    for column in ("tenure", "spend", "calls", "plan", "churn", "churn_score"):
        assert f"<b>{column}</b>" in html
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")


def _png_pixels(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Width, height and RGB pixels of an 8-bit RGB or RGBA PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, idat, width, height, channels = 8, b"", 0, 0, 0
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        chunk, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        if chunk == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6)
            channels = 3 if color == 2 else 4
        elif chunk == b"IDAT":
            idat += body
        offset += 12 + length
    raw, stride, previous = zlib.decompress(idat), width * channels, bytearray(width * channels)
    pixels: list[tuple[int, int, int]] = []
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, up_left = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)) & 0xFF
        pixels.extend((line[i], line[i + 1], line[i + 2]) for i in range(0, stride, channels))
        previous = line
    return width, height, pixels


def _rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def test_report_renders_in_headless_chromium_with_its_plots(monitoring: MonitoringClient, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        message = "Debian's chromium is not installed (apt-get install chromium)"
        if os.environ.get("FALAJ_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    page, _ = _render(monitoring)
    html_path, png_path = tmp_path / "report.html", tmp_path / "report.png"
    html_path.write_bytes(page)
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={png_path}",
            "--window-size=1200,2000",
            html_path.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    width, height, pixels = _png_pixels(png_path.read_bytes())
    assert (width, height) == (1200, 2000)
    counts = {
        name: sum(1 for p in pixels if p == _rgb(color)) for name, color in (("reference", REFERENCE_COLOR), ("current", CURRENT_COLOR))
    }
    # Every plot draws bars in both colours: thousands of pixels of each, not a blank page.
    assert counts["reference"] > 3000 and counts["current"] > 3000, counts
    assert len(set(pixels[::97])) > 20
