"""Headless-browser checks of a self-contained HTML page (the aggregate's reports/report.html).

find_chromium()   -> the chromium binary on PATH (or $CHROMIUM), or None.
ensure_chromium() -> the same, installing Debian's `chromium` package with apt-get when it is missing
                     (as root, or through passwordless sudo; set CADDIE_BROWSER_INSTALL=0 to forbid).
require_chromium() -> the same, raising ChromiumUnavailable(reason) instead of returning None.
render(path)      -> what the browser made of the page: title, images (loaded or not), tables (cell texts), errors.
screenshot(path, png) -> a PNG of the page's first screen, to look at.

The page is copied to a temporary folder (the original is not touched) and loaded from file:// with every
network request refused (all traffic goes to a dead proxy, loopback included, and no host name resolves),
so an image that is not embedded in the page (http://, or a path relative to it) is reported as not loaded.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome",
              "chrome-headless-shell", "headless_shell")
PROBE_ID = "__caddie_probe"

# Flags for a quiet, offline, throw-away browser. --no-sandbox: the sandbox refuses to start as root.
OFFLINE_FLAGS = (
    "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
    "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
    "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
    "--mute-audio", "--hide-scrollbars",
    # No network: every request goes to a proxy on the discard port, where nothing listens ('<-loopback>'
    # sends loopback there too), and no host name resolves.
    "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--host-resolver-rules=MAP * ~NOTFOUND",
)


class ChromiumUnavailable(RuntimeError):
    """No chromium could be found or installed; the message says why."""


def _runs(binary: str) -> bool:
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "chrom" in (done.stdout + done.stderr).lower()


def find_chromium() -> str | None:
    """Path of a working chromium: $CHROMIUM if set, else the first of CANDIDATES on PATH that runs."""
    names = [os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else list(CANDIDATES)
    for name in names:
        path = shutil.which(name)
        if path and _runs(path):
            return path
    return None


def chromium_version(binary: str) -> str:
    return subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL).stdout.strip()


def _apt(prefix: list[str], args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = prefix + ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q"] + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def install_chromium(timeout: int = 900) -> None:
    """apt-get install Debian's chromium (no recommends); raises ChromiumUnavailable with the reason."""
    if os.environ.get("CADDIE_BROWSER_INSTALL", "1").lower() in ("0", "no", "false"):
        raise ChromiumUnavailable("chromium is not installed and CADDIE_BROWSER_INSTALL forbids installing it")
    if not shutil.which("apt-get"):
        raise ChromiumUnavailable("chromium is not installed and there is no apt-get to install it with")
    if os.geteuid() == 0:
        prefix = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True,
                                                 stdin=subprocess.DEVNULL).returncode == 0:
        prefix = ["sudo", "-n"]
    else:
        raise ChromiumUnavailable("chromium is not installed, and installing it needs root or passwordless sudo "
                                  "(apt-get install chromium)")
    try:
        _apt(prefix, ["update"], timeout=min(timeout, 300))  # a failed update may still leave usable lists
        done = _apt(prefix, ["install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=120",
                             "chromium"], timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ChromiumUnavailable(f"apt-get install chromium did not finish in {timeout} s") from None
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise ChromiumUnavailable("apt-get install chromium failed: " + " | ".join(tail))


def require_chromium() -> str:
    """find_chromium(), installing the package first when it is missing; raises ChromiumUnavailable."""
    found = find_chromium()
    if found:
        return found
    install_chromium()
    found = find_chromium()
    if not found:
        raise ChromiumUnavailable("apt-get installed chromium, but no working chromium binary is on PATH")
    return found


def ensure_chromium() -> str | None:
    """require_chromium(), or None when chromium can be neither found nor installed."""
    try:
        return require_chromium()
    except ChromiumUnavailable:
        return None


def _run_chromium(binary: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run chromium in its own process group with a throw-away profile; kill the whole group on time-out."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [binary, *OFFLINE_FLAGS, f"--user-data-dir={profile}", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# Collects script errors, console.error calls and resources that failed to load, from the page's start on.
_COLLECT_JS = """<script>(function () {
  var errors = window.__probeErrors = [];
  window.addEventListener('error', function (e) {
    var t = e.target;
    if (t && t !== window && (t.src || t.href)) errors.push('failed to load <' + t.tagName.toLowerCase() + '> '
        + String(t.src || t.href).slice(0, 80));
    else errors.push('script error: ' + (e.message || e));
  }, true);
  window.addEventListener('unhandledrejection', function (e) { errors.push('unhandled rejection: ' + e.reason); });
  var ce = console.error;
  console.error = function () { errors.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
                                return ce.apply(console, arguments); };
})();</script>"""

# On load (or after 4 s of virtual time, whichever first), writes the page's facts as JSON into <pre id=__probe>.
_PROBE_JS = """<script>(function () {
  var done = false;
  function text(el) { return (el.innerText || el.textContent || '').replace(/\\s+/g, ' ').trim(); }
  // Chromium shows a cut-short PNG as far as it goes, with its full size: look for the closing IEND chunk.
  function truncatedPng(src) {
    var m = /^data:image\\/png;base64,/i.exec(src);
    if (!m) return false;
    try { return atob(src.slice(m[0].length).replace(/\\s+/g, '')).slice(-8) !== 'IEND\\xaeB`\\x82'; }
    catch (e) { return true; }
  }
  function probe(loaded) {
    if (done) return; done = true;
    var errors = (window.__probeErrors || []).slice();
    var images = Array.prototype.map.call(document.images, function (img) {
      var r = img.getBoundingClientRect(), src = String(img.getAttribute('src') || '');
      var truncated = truncatedPng(src);
      if (truncated) errors.push('truncated PNG data URI <img> ' + src.slice(0, 80));
      return {src_prefix: src.slice(0, 40), complete: img.complete,
              natural_width: img.naturalWidth, natural_height: img.naturalHeight, truncated: truncated,
              loaded: img.complete && img.naturalWidth > 0 && !truncated, width: r.width, height: r.height};
    });
    var tables = Array.prototype.map.call(document.querySelectorAll('table'), function (table) {
      return Array.prototype.map.call(table.rows, function (row) {
        return Array.prototype.map.call(row.cells, text);
      });
    });
    var facts = {title: document.title, loaded: loaded, images: images, tables: tables,
                 text_length: text(document.body).length, errors: errors};
    var pre = document.createElement('pre');
    pre.id = '__PROBE_ID__';
    pre.textContent = JSON.stringify(facts);
    document.body.appendChild(pre);
  }
  window.addEventListener('load', function () { setTimeout(function () { probe(true); }, 0); });
  setTimeout(function () { probe(false); }, 4000);
})();</script>""".replace("__PROBE_ID__", PROBE_ID)


def _instrument(page: str) -> str:
    """The page with the error collector as early as possible and the probe at the end of <body>."""
    head = re.search(r"<head\b[^>]*>", page, re.I) or re.search(r"<html\b[^>]*>", page, re.I) \
        or re.search(r"<!doctype[^>]*>", page, re.I)
    at = head.end() if head else 0
    page = page[:at] + _COLLECT_JS + page[at:]
    ends = [m.start() for m in re.finditer(r"</body\s*>", page, re.I)]
    at = ends[-1] if ends else len(page)
    return page[:at] + _PROBE_JS + page[at:]


def render(html_path, binary: str | None = None, timeout: float = 60) -> dict:
    """Load the page in headless chromium, offline, and return what it shows.

    {"title": str, "loaded": bool (the load event fired), "text_length": int (characters of body text),
     "images": [{"src_prefix", "complete", "natural_width", "natural_height", "truncated", "loaded",
                 "width", "height"}],
     "tables": [[[cell text, ...] per row] per table], "errors": [str]}

    An image counts as loaded when complete, naturalWidth > 0 and not truncated (a data:image/png URI whose
    bytes lack the closing IEND chunk: Chromium draws such a PNG as far as it goes, at its full size, with no
    error); width/height are its size on the page. Table cell texts have their white space collapsed.
    One chromium start per call (about 1 s): render a page once and check everything on the result.
    """
    binary = binary or require_chromium()
    source = Path(html_path)
    with tempfile.TemporaryDirectory(prefix="render-") as tmp:
        copy = Path(tmp) / source.name
        copy.write_text(_instrument(source.read_text(encoding="utf-8")), encoding="utf-8")
        try:
            done = _run_chromium(binary, ["--virtual-time-budget=5000", "--dump-dom", copy.as_uri()], timeout)
        except subprocess.TimeoutExpired:
            return _failed(f"chromium did not finish rendering {source} in {timeout} s")
    found = re.findall(rf'<pre id="{PROBE_ID}">(.*?)</pre>', done.stdout, re.S)
    if not found:
        tail = " | ".join(done.stderr.strip().splitlines()[-5:])
        return _failed(f"the probe did not report (chromium exit {done.returncode}): {tail}")
    return json.loads(html.unescape(found[-1]))


def _failed(reason: str) -> dict:
    return {"title": None, "loaded": False, "text_length": 0, "images": [], "tables": [], "errors": [reason]}


def screenshot(html_path, png_path, binary: str | None = None, size: tuple[int, int] = (1280, 2000),
               timeout: float = 60) -> Path:
    """A PNG of the page's first `size` pixels (offline, like render), e.g. to look at with an image viewer."""
    binary = binary or require_chromium()
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    _run_chromium(binary, ["--virtual-time-budget=5000", f"--window-size={size[0]},{size[1]}",
                           f"--screenshot={png}", Path(html_path).resolve().as_uri()], timeout)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot of {html_path}")
    return png


if __name__ == "__main__":  # python tests/browser.py [page.html]: install if needed, print the version (and facts)
    import sys
    try:
        path = require_chromium()
    except ChromiumUnavailable as e:
        sys.exit(f"no chromium: {e}")
    print(path, chromium_version(path))
    for arg in sys.argv[1:]:
        print(json.dumps(render(arg, path), indent=1))
