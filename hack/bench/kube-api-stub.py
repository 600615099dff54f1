#!/usr/bin/env python3
"""A read-only Kubernetes API stand-in for hack/bench/dnslocal-zone.sh (no real kube-apiserver can run in the
benchmark's network namespace: it needs etcd and a control plane). Serves, over plain HTTP:

  GET /api/v1/services                          -> DIR/services.json (a ServiceList)
  GET /apis/discovery.k8s.io/v1/endpointslices  -> DIR/endpointslices.json (an EndpointSliceList)
  ...?limit=N[&continue=T]                      -> that page, `metadata.continue` set while more follow
  ...?watch=1                                   -> 200, then nothing until the client goes (no changes)
  anything else                                 -> 404 Status

Usage: kube-api-stub.py DIR HOST PORT
"""
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

DIR, HOST, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
LISTS = {
    "/api/v1/services": "services.json",
    "/apis/discovery.k8s.io/v1/endpointslices": "endpointslices.json",
}
BODIES = {path: json.load(open(f"{DIR}/{name}")) for path, name in LISTS.items()}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path not in BODIES:
            body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "reason": "NotFound", "code": 404, "message": path}).encode()
            self.send_response(404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if "watch=1" in query or "watch=true" in query:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            while True:  # no changes; the client's timeoutSeconds or its going away ends it
                time.sleep(3600)
        params = parse_qs(query)
        full = BODIES[path]
        limit = int(params.get("limit", ["0"])[0] or 0)
        start = int(params.get("continue", ["0"])[0] or 0)
        page = dict(full)
        page["metadata"] = dict(full["metadata"])
        if limit > 0:
            page["items"] = full["items"][start:start + limit]
            if start + limit < len(full["items"]):
                page["metadata"]["continue"] = str(start + limit)
        body = json.dumps(page).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer((HOST, PORT), Handler).serve_forever()
