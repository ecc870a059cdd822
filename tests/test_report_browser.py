"""report.html in a real browser (headless Chromium, Debian package `chromium`): every image loads, a click on a
header sorts its table, and the console stays free of errors. A probe script is added to a copy of the page and
its findings read back from the DOM that `chromium --headless --dump-dom` prints; no other dependency."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from featx.evaluate.report import write_report
from featx.probe.run import HeadConfig, run_probe

CHROMIUM = Path("/usr/bin/chromium")

# Records console errors and uncaught exceptions from the start, then (once everything has loaded) checks the
# images and sorts the per-class table by its "class" column, and writes the findings into the page.
BEFORE = """<script>window.__errors = [];
const __error = console.error; console.error = (...a) => { window.__errors.push(a.join(' ')); __error(...a); };
window.addEventListener('error', e => window.__errors.push(String(e.message || e.target.src)), true);</script>"""
AFTER = """<script>window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const heads = t => Array.from(t.tHead.rows[0].cells).map(th => th.textContent);
  // the per-class table: the one with a "class" column (last on the page, collapsed)
  const table = Array.from(document.querySelectorAll('table.sortable')).find(t => heads(t).includes('class'));
  const col = heads(table).indexOf('class');
  const names = () => Array.from(table.tBodies[0].rows).map(r => r.cells[col].textContent);
  const before = names(); table.tHead.rows[0].cells[col].click(); const after = names();
  const out = document.createElement('pre'); out.id = 'probe';
  out.textContent = JSON.stringify({images: imgs.length,
    broken: imgs.filter(i => !(i.naturalWidth > 0)).map(i => i.src), alt: imgs.filter(i => !i.alt).length,
    before, after, errors: window.__errors});
  document.body.appendChild(out);
});</script>"""


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium (apt-get install chromium) is absent")
def test_the_report_works_in_a_real_browser(mobilenet_features_20, real_cache, tmp_path):
    run = tmp_path / "run"
    run_probe(features=mobilenet_features_20, out=run, heads=[HeadConfig()], epochs=2, keep=1, device="cpu")
    page = write_report(run=run, out=tmp_path / "report", data=real_cache, device="cpu")  # with the gallery
    probed = page.with_name("probed.html")
    text = page.read_text()
    probed.write_text(text.replace("<head>", "<head>" + BEFORE, 1).replace("</body>", AFTER + "</body>", 1))
    dom = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--allow-file-access-from-files",
            "--virtual-time-budget=10000",
            "--dump-dom",
            probed.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    found = re.search(r"<pre id=\"probe\">(.*?)</pre>", dom, re.S)
    assert found, dom[-2000:]
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["images"] == len(re.findall(r"<img ", text)) >= 10 and result["broken"] == [] and result["alt"] == 0
    assert result["after"] == sorted(result["before"], key=str.lower) != result["before"]
    assert result["errors"] == []
