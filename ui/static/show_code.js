// "Show code": a playground request as curl, Python or JavaScript, with the user's token, ready to paste.

const BASE = document.body.dataset.baseUrl;

function pyLiteral(value, indent = "") {
  const inner = indent + "    ";
  if (value === null || value === undefined) return "None";
  if (typeof value === "boolean") return value ? "True" : "False";
  if (typeof value !== "object") return JSON.stringify(value); // JSON strings and numbers read the same in Python
  const items = Array.isArray(value)
    ? value.map((v) => inner + pyLiteral(v, inner))
    : Object.entries(value).map(([k, v]) => `${inner}${JSON.stringify(k)}: ${pyLiteral(v, inner)}`);
  const [open, close] = Array.isArray(value) ? ["[", "]"] : ["{", "}"];
  return items.length ? `${open}\n${items.join(",\n")},\n${indent}${close}` : open + close;
}

function python(s, format, body, token) {
  const args = Object.entries(body).map(([k, v]) => `    ${k}=${pyLiteral(v, "    ")},`).join("\n");
  if (s.format === "anthropic") {
    return `import anthropic\n\nclient = anthropic.Anthropic(base_url="${BASE}/${s.route}", api_key="${token}")\n` +
      `response = client.messages.create(\n${args}\n)\nprint(response${format.answerPath})\n`;
  }
  if (s.format === "gemini") {
    const path = format.answerPath.replace(/\.(\w+)/g, '["$1"]');
    return `import requests\n\nresponse = requests.post(\n    "${BASE}${format.path(s, false)}",\n` +
      `    headers={"x-goog-api-key": "${token}"},\n    json=${pyLiteral(body, "    ")},\n)\n` +
      `response.raise_for_status()\nprint(response.json()${path})\n`;
  }
  return `from openai import OpenAI\n\nclient = OpenAI(base_url="${BASE}/${s.route}/v1", api_key="${token}")\n` +
    `response = client.chat.completions.create(\n${args}\n)\nprint(response${format.answerPath})\n`;
}

function curl(s, format, body, token) {
  const auth = format.tokenHeader === "Authorization" ? `Authorization: Bearer ${token}` : `${format.tokenHeader}: ${token}`;
  const headers = [auth, "Content-Type: application/json", ...Object.entries(format.headers).map(([k, v]) => `${k}: ${v}`)];
  const json = JSON.stringify(body, null, 2).replace(/'/g, `'\\''`);
  return `curl "${BASE}${format.path(s, false)}" \\\n${headers.map((h) => `  -H "${h}" \\\n`).join("")}  -d '${json}'\n`;
}

function javascript(s, format, body) {
  const auth = format.tokenHeader === "Authorization" ? "Authorization: `Bearer ${token}`" : `"${format.tokenHeader}": token`;
  const headers = [auth, '"Content-Type": "application/json"', ...Object.entries(format.headers).map(([k, v]) => `"${k}": "${v}"`)];
  const json = JSON.stringify(body, null, 2).replace(/\n/g, "\n    ");
  return `<script type="module">\n  import { getProfile } from "${BASE}/aipipe.js";\n\n` +
    "  const { token } = getProfile();\n" +
    `  if (!token) window.location = \`${BASE}/login?redirect=\${window.location.href}\`;\n\n` +
    `  const response = await fetch("${BASE}${format.path(s, false)}", {\n    method: "POST",\n` +
    `    headers: { ${headers.join(", ")} },\n    body: JSON.stringify(${json}),\n  }).then((r) => r.json());\n` +
    `  console.log(response${format.answerPath});\n</script>\n`;
}

export const WRITERS = { curl, python, js: javascript };
