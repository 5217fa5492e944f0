"""The headless-browser harness (tests/browser.py) on synthetic pages: it must see a good page as good,
and a broken or network-dependent image as not loaded, so that the report's HTML test can fail."""
import base64
import http.server
import io
import threading

import pytest
from matplotlib.figure import Figure

import browser


def png_bytes(width_in=2.0, height_in=1.0, dpi=50) -> bytes:
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    fig.add_subplot().plot([0, 1, 2], [3, 1, 2])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{title}</title></head>\n'
            f"<body>\n{body}\n</body></html>\n")


TABLE = """<table><thead><tr><th>arm</th><th>val bpb</th><th>Δ vs base</th></tr></thead>
<tbody><tr><td>baseline</td><td>1.2345</td><td>0.0000</td></tr>
<tr><td>gptq-int6 &amp; lcq</td><td>
  1.2401 </td><td>+0.0056</td></tr></tbody></table>"""


@pytest.fixture(scope="module")
def good(chromium, tmp_path_factory):
    """A page with an embedded matplotlib PNG (100x50 px) and a table, rendered once."""
    path = tmp_path_factory.mktemp("good") / "report.html"
    path.write_text(page("Good report", f'<h1>Results</h1>\n<img alt="fig" src="{data_uri(png_bytes())}">\n{TABLE}'),
                    encoding="utf-8")
    before = path.read_bytes()
    facts = browser.render(path, chromium)
    assert path.read_bytes() == before, "render must not modify the page"
    return facts


def test_good_page_renders(good):
    assert good["errors"] == []
    assert good["loaded"] is True
    assert good["title"] == "Good report"
    assert good["text_length"] > 0


def test_embedded_png_loads(good):
    [img] = good["images"]
    assert img["src_prefix"].startswith("data:image/png;base64,")
    assert img["loaded"] and img["complete"]
    assert (img["natural_width"], img["natural_height"]) == (100, 50)
    assert img["width"] > 0 and img["height"] > 0


def test_table_cells_parsed(good):
    assert good["tables"] == [[["arm", "val bpb", "Δ vs base"],
                               ["baseline", "1.2345", "0.0000"],
                               ["gptq-int6 & lcq", "1.2401", "+0.0056"]]]


def test_broken_data_uri_is_not_loaded(chromium, tmp_path):
    """A PNG cut short (which Chromium still draws, partly) and base64 that is no image at all."""
    truncated = data_uri(png_bytes())[:200]
    path = tmp_path / "broken.html"
    path.write_text(page("Broken", f'<img src="{truncated}">\n<img src="data:image/png;base64,AAAA">'))
    facts = browser.render(path, chromium)
    cut, bad = facts["images"]
    assert not cut["loaded"] and cut["truncated"], "a cut-short PNG must not count as loaded"
    assert not bad["loaded"] and bad["natural_width"] == 0
    assert f"truncated PNG data URI <img> {truncated[:80]}" in facts["errors"]
    assert "failed to load <img> data:image/png;base64,AAAA" in facts["errors"]


class _Counting(http.server.BaseHTTPRequestHandler):
    hits = []

    def do_GET(self):
        self.hits.append(self.path)
        body = png_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_images_outside_the_page_are_not_loaded(chromium, tmp_path):
    """No network, loopback included, and no files beside the page: only embedded images load."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        (tmp_path / "fig.png").write_bytes(png_bytes())
        path = tmp_path / "remote.html"
        path.write_text(page("Remote", f'<img src="http://127.0.0.1:{port}/fig.png">\n'
                                       f'<img src="http://localhost:{port}/fig.png">\n'
                                       '<img src="http://example.com/fig.png">\n'
                                       '<img src="fig.png">\n'
                                       f'<img src="{data_uri(png_bytes())}">'))
        facts = browser.render(path, chromium)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert [img["loaded"] for img in facts["images"]] == [False, False, False, False, True]
    assert _Counting.hits == [], "the browser reached the loopback server"
    assert facts["title"] == "Remote"
