// Model output -> safe HTML. The output is untrusted: marked renders raw HTML in it as text,
// DOMPurify sanitises what marked produced (links to javascript: and the like), and the page's
// Content-Security-Policy forbids inline script on top of that. Globals: marked, DOMPurify, hljs
// (vendored, loaded by playground.html before this module).

const SANITIZE_OPTIONS = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "option"],
  FORBID_ATTR: ["style"],
};

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function highlightCode(code, requestedLanguage) {
  if (requestedLanguage && hljs.getLanguage(requestedLanguage)) {
    return { html: hljs.highlight(code, { language: requestedLanguage, ignoreIllegals: true }).value, language: requestedLanguage };
  }
  const detected = hljs.highlightAuto(code);
  return { html: detected.value, language: requestedLanguage || detected.language || "text" };
}

const markdown = new marked.Marked({
  gfm: true,
  breaks: false,
  renderer: {
    // Raw HTML in model output (block or inline) is shown as text, never parsed as markup.
    html(token) {
      return token.block ? `<p class="raw-html">${escapeHtml(token.text)}</p>\n` : escapeHtml(token.text);
    },
    code(token) {
      const word = (token.lang || "").trim().split(/\s+/)[0].toLowerCase();
      const requested = /^[a-z0-9_+#.-]{1,32}$/.test(word) ? word : "";
      const { html, language } = highlightCode(token.text, requested);
      const label = escapeHtml(language);
      return `<pre data-language="${label}"><code class="hljs language-${label}">${html}</code></pre>\n`;
    },
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

/** Render Markdown `text` into `element`, each code block with a language label and a Copy button. */
export function renderMarkdownInto(element, text) {
  element.innerHTML = DOMPurify.sanitize(markdown.parse(text), SANITIZE_OPTIONS);
  for (const pre of element.querySelectorAll("pre")) {
    const block = document.createElement("div");
    block.className = "code-block";
    const header = document.createElement("div");
    header.className = "code-header";
    const label = document.createElement("span");
    label.className = "code-language";
    label.textContent = pre.dataset.language || "text";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy-button";
    copy.textContent = "Copy";
    header.append(label, copy);
    pre.replaceWith(block);
    block.append(header, pre);
  }
}

export async function copyText(text) {
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return true;
    }
  } catch (error) {
    // fall through to the selection-based copy (plain http on a LAN address)
  }
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.append(area);
  area.select();
  let copied = false;
  try {
    copied = document.execCommand("copy");
  } catch (error) {
    copied = false;
  }
  area.remove();
  return copied;
}
