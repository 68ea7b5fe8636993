"""The ceiling for this stack: a bare Tornado passthrough, no auth, no budget, no billing.

`python -m tests.bench_passthrough --port P --upstream http://127.0.0.1:U` (uvloop when installed).
Upstream calls go through aiohttp's pooled client, as the gateway's do. JSON answers leave whole;
event streams are flushed read by read, as the gateway does.
"""
import argparse
import asyncio

import aiohttp
import tornado.web


class Passthrough(tornado.web.RequestHandler):
    async def post(self, path: str) -> None:
        headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench-operator"}
        async with self.settings["client"].post(self.settings["upstream"] + self.request.uri, data=self.request.body,
                                                headers=headers) as answer:
            self.set_status(answer.status)
            self.set_header("Content-Type", answer.headers.get("Content-Type", ""))
            streaming = "event-stream" in self._headers["Content-Type"]
            async for chunk in answer.content.iter_any():
                self.write(chunk)
                if streaming:
                    await self.flush()
        self.finish()


async def serve(port: int, upstream: str) -> None:
    client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
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
