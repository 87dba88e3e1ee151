"""The gateway's page in a real browser: Debian's chromium, headless, driven by
Playwright (PyPI; it drives the machine's chromium, it downloads none).

Run by tests/interop/run.sh. A person's steps: open the page, pick files, press
Classify, watch the job fill in, and read the counts from the page; then the same
behind an API key, which the page asks for. With GATEWAY_SCREENSHOT=PATH the finished
page is saved there (docs/gateway.png in the README).
"""

import hashlib
import os
import shutil
import tempfile
import unittest

from playwright.sync_api import expect, sync_playwright

from test_gateway import ROOT, start_gateway
from test_interop import files_under, stop

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
API_KEY = "page-key-41"


class Page(unittest.TestCase):
    def serve(self, api_key=None):
        data = tempfile.mkdtemp(prefix="gateway-page-")
        self.addCleanup(shutil.rmtree, data, True)
        gateway, address = start_gateway("embedded", "page-requests", api_key, data)
        self.addCleanup(stop, gateway)
        self.addCleanup(gateway.stdout.close)
        return f"http://{address}/"

    def upload_and_wait(self, page, files, expected_classified):
        page.set_input_files("#files", files)
        page.click("#send")
        row = page.locator("#jobs tr[data-job]").first
        expect(row.locator(".state")).to_have_text("done", timeout=60_000)
        self.assertEqual(int(row.locator(".files").inner_text()), len(files))
        self.assertEqual(int(row.locator(".classified").inner_text()), expected_classified)
        return row

    def test_a_person_uploads_files_and_watches_them_classified(self):
        url = self.serve()
        examples = files_under(os.path.join(ROOT, "examples"))[::10]
        bad = os.path.join(tempfile.mkdtemp(prefix="gateway-page-bad-"), "notes.txt")
        self.addCleanup(shutil.rmtree, os.path.dirname(bad), True)
        with open(bad, "w") as file:
            file.write("not an image\n")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 520})
            page.goto(url)
            expect(page.locator("#jobs")).to_contain_text("No jobs yet.")
            row = self.upload_and_wait(page, examples + [bad], expected_classified=len(examples))
            self.assertEqual(int(row.locator(".errors").inner_text()), 1)
            self.assertEqual(row.locator(".bar span").get_attribute("style"), "width: 100%;")
            report = row.locator("a", has_text="report").get_attribute("href")
            page.goto(url.rstrip("/") + report)
            expect(page.locator("body")).to_contain_text("UNSUPPORTED_FORMAT")
            page.goto(url)
            expect(page.locator("#jobs tr[data-job] .state").first).to_have_text("done")
            if os.environ.get("GATEWAY_SCREENSHOT"):
                page.screenshot(path=os.environ["GATEWAY_SCREENSHOT"])
            browser.close()

    def test_behind_keys_the_page_asks_for_one(self):
        url = self.serve(api_key=API_KEY)
        examples = files_under(os.path.join(ROOT, "examples"))[:3]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(url)
            expect(page.locator("#key-label")).to_be_visible()
            expect(page.locator("#message")).to_contain_text("API key")
            page.fill("#key", API_KEY)
            self.upload_and_wait(page, examples, expected_classified=3)
            browser.close()


if __name__ == "__main__":
    unittest.main(verbosity=2)
