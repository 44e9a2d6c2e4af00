// What a browser sees of ComfyUI's first seconds, written into #vue-app so a headless
// browser's DOM tells whether the page came up: "ready" once system_stats answered and the
// socket's first status message arrived; with ?queue=1 it then queues a model-free prompt
// through POST /api/prompt and waits on the socket for "executing" with node null.
const app = document.getElementById("vue-app");
const say = (text) => { app.dataset.state = text; app.textContent = text; };
say("loading");
const clientId = crypto.randomUUID ? crypto.randomUUID().replace(/-/g, "") : String(Date.now());
const stats = await (await fetch("/api/system_stats")).json();
const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws?clientId=${clientId}`);
ws.binaryType = "arraybuffer";
let promptId = null;
ws.onerror = () => say("websocket error");
ws.onmessage = async (event) => {
  if (typeof event.data !== "string") return;
  const msg = JSON.parse(event.data);
  if (msg.type === "status" && msg.data.sid && !app.dataset.ready) {
    app.dataset.ready = "1";
    say(`ready ${stats.system.comfyui_version}`);
    if (new URLSearchParams(location.search).get("queue")) {
      const prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["1", 0]}},
      };
      const r = await fetch("/api/prompt", {method: "POST", headers: {"Content-Type": "application/json"},
                                            body: JSON.stringify({prompt, client_id: clientId})});
      if (!r.ok) { say(`queue failed ${r.status}`); return; }
      promptId = (await r.json()).prompt_id;
      say(`queued ${promptId}`);
    }
  } else if (msg.type === "executing" && msg.data.node === null && msg.data.prompt_id === promptId) {
    say(`done ${promptId}`);
  }
};
