"""The baseline of the download benchmark: a bare FastAPI endpoint returning a small JSON dict."""

import time

from fastapi import FastAPI

app = FastAPI()


@app.get("/bare")
async def bare() -> dict[str, object]:
    return {"ok": True, "time": int(time.time())}
