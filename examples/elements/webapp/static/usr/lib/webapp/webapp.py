#!/usr/bin/python3
"""The example release's web service: answers /health with the release it runs."""

import json
import http.server

RELEASE = "/etc/imagetool/release.json"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(RELEASE) as f:
            release = json.load(f)
        if self.path == "/health":
            body = {"status": "ok", "release": f"{release['name']}-{release['version']}"}
        elif self.path == "/":
            body = {"hello": "from webapp", "version": release["version"]}
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
