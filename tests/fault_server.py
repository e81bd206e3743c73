"""A reward server that misbehaves on purpose, for the client's fault tests (run as a script).

It speaks OpenRLHF's protocol with two dimensions: `rewards` = extra_logs["up"] = len(query) and
extra_logs["down"] = -len(query), so every answer is checkable. Flags choose one fault.
"""

import argparse
import asyncio
import json

from aiohttp import web


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before each answer")
    parser.add_argument("--fail-first", type=int, default=0, help="answer HTTP 500 to the first N requests")
    parser.add_argument("--wrong-length", action="store_true", help="answer one reward too few")
    parser.add_argument("--nan-at", type=int, default=None, help="answer NaN for this sample of each request")
    parser.add_argument("--not-json", action="store_true", help="answer 200 with a body that is not JSON")
    parser.add_argument("--require-key", default=None, help="answer 401 unless 'Authorization: Bearer KEY'")
    parser.add_argument("--raw-first", default=None,
                        help="JSON text written, as is, for sample 0's reward in every dimension (e.g. an integer of 400 digits)")
    parser.add_argument("--body-kind", choices=["nested", "padded"], default=None,
                        help="nested: a JSON array nested 100,000 deep; padded: a valid answer padded with --body-mb MiB")
    parser.add_argument("--body-mb", type=float, default=2.0)
    args = parser.parse_args()
    served = {"requests": 0}

    async def get_reward(request):
        served["requests"] += 1
        number = served["requests"]  # read now: requests that arrive together each count before any is answered
        if args.require_key and request.headers.get("Authorization") != f"Bearer {args.require_key}":
            return web.json_response({"detail": "missing or wrong API key"}, status=401)
        body = await request.json()
        await asyncio.sleep(args.delay)
        if number <= args.fail_first:
            return web.json_response({"detail": "warming up"}, status=500)
        if args.not_json:
            return web.Response(text="<html>oops</html>")
        if args.body_kind == "nested":
            return web.Response(text='{"rewards": ' + "[" * 100_000 + "]" * 100_000 + "}")
        up = [float(len(q)) for q in body["query"]]
        if args.wrong_length:
            up = up[:-1]
        if args.nan_at is not None and args.nan_at < len(up):
            up[args.nan_at] = float("nan")  # json.dumps writes NaN, as a buggy Python server would
        answer = {"rewards": up, "scores": up, "extra_logs": {"up": up, "down": [-x for x in up]}}
        if args.body_kind == "padded":
            answer["padding"] = "x" * int(args.body_mb * 2**20)
        text = json.dumps(answer)
        if args.raw_first is not None:  # JSON that json.dumps cannot write, such as 1e400 or a 400-digit integer
            text = text.replace(f"[{up[0]!r}", f"[{args.raw_first}").replace(f"[{-up[0]!r}", f"[{args.raw_first}")
        return web.Response(text=text, content_type="application/json")

    async def health(request):
        return web.json_response({"status": "ok", "requests": served["requests"]})

    app = web.Application()
    app.add_routes([web.post("/get_reward", get_reward), web.get("/health", health)])
    # A short shutdown: a handler held by --delay must not keep a stopped test waiting.
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, shutdown_timeout=0.5)


if __name__ == "__main__":
    main()
