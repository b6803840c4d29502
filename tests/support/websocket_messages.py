"""Every message a ComfyUI server sends to one websocket client (progress, executed, ...).

What any connected browser sees is published; the end-to-end privacy test records it here.
Uses aiohttp's client (ComfyUI itself needs aiohttp) in a background thread.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid


class WebsocketMessages:
    """Context manager: connect as a client, collect JSON messages until closed."""

    def __init__(self, base_url: str):
        self.url = base_url.replace("http://", "ws://")
        self.client_id = uuid.uuid4().hex
        self.messages: list[dict] = []
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WebsocketMessages:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("could not connect to ComfyUI's websocket")
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.5)  # let the last messages of the prompt arrive
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._listen())

    async def _listen(self) -> None:
        import aiohttp

        self._stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={self.client_id}") as ws:
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        message = await asyncio.wait_for(ws.receive(), timeout=0.2)
                    except asyncio.TimeoutError:
                        continue
                    if message.type == aiohttp.WSMsgType.TEXT:
                        self.messages.append(json.loads(message.data))
                    elif message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break
