"""The ceiling for this stack: a bare Tornado passthrough, no auth, no budget, no billing.

`python -m tests.bench_passthrough --port P --upstream http://127.0.0.1:U` (uvloop when installed).
JSON answers leave whole; event streams are flushed chunk by chunk, as the gateway does.
"""
import argparse
import asyncio

import tornado.web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest


class Passthrough(tornado.web.RequestHandler):
    async def post(self, path: str) -> None:
        self.streaming = False
        request = HTTPRequest(self.settings["upstream"] + self.request.uri, method="POST", body=self.request.body,
                              headers={"Content-Type": "application/json", "Authorization": "Bearer sk-bench-operator"},
                              header_callback=self.on_header, streaming_callback=self.on_chunk, request_timeout=300)
        await self.settings["client"].fetch(request, raise_error=False)
        self.finish()

    def on_header(self, line: str) -> None:
        name, _, value = line.partition(":")
        if line.startswith("HTTP/"):
            self.set_status(int(line.split()[1]))
        elif name.lower() == "content-type":
            self.set_header("Content-Type", value.strip())
            self.streaming = "event-stream" in value

    async def on_chunk(self, chunk: bytes) -> None:
        self.write(chunk)
        if self.streaming:
            await self.flush()


async def serve(port: int, upstream: str) -> None:
    client = AsyncHTTPClient(force_instance=True, max_clients=100_000)
    app = tornado.web.Application([(r"/(.*)", Passthrough)], upstream=upstream, client=client,
                                  log_function=lambda handler: None)
    app.listen(port, "127.0.0.1", backlog=4096)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.port, args.upstream.rstrip("/")))


if __name__ == "__main__":
    main()
