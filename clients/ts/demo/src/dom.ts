/** The few DOM helpers the demo needs (no framework). */
import { RpcError, Timestamp } from "@hangout/client";

export function byId<T extends HTMLElement = HTMLElement>(id: string): T {
  const el = document.getElementById(id);
  if (!el) throw new Error(`#${id} missing from index.html`);
  return el as T;
}

export function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props: Partial<Record<string, string>> = {},
  ...children: Array<Node | string>
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) if (value !== undefined) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

export function field(form: HTMLFormElement, name: string): string {
  return (new FormData(form).get(name) ?? "").toString().trim();
}

/** Runs a form's submit through `action`, with the button disabled meanwhile
 * and any failure shown to the user. */
export function onSubmit(form: HTMLFormElement, action: (form: HTMLFormElement) => Promise<void>): void {
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const button = form.querySelector("button");
    if (button) button.disabled = true;
    action(form)
      .then(() => notice(""))
      .catch(showError)
      .finally(() => {
        if (button) button.disabled = false;
      });
  });
}

export function notice(text: string): void {
  const p = byId("notice");
  p.textContent = text;
  p.hidden = text === "";
}

/** What went wrong, in words for the user: the server's code picks the text. */
export function showError(error: unknown): void {
  if (!(error instanceof RpcError)) {
    notice(error instanceof Error ? error.message : String(error));
    return;
  }
  const words: Record<string, string> = {
    email_taken: "That email is already registered: log in instead.",
    invalid_credentials: "Wrong email or password.",
    kyc_required: "Your identity is not verified yet (KYC).",
    insufficient_funds: "Not enough money in the wallet: top up first.",
    slot_unavailable: "That time is taken: pick another.",
    host_not_bookable: "This host cannot be booked.",
    rate_limited: "Too many attempts: wait a minute.",
    unavailable: "The server is busy: try again.",
  };
  const fields = error.fieldErrors.map((f) => `${f.field}: ${f.reason}`).join("; ");
  notice(words[error.code] ?? (fields ? `Check ${fields}` : error.message));
}

export function when(t: Timestamp | null | undefined): string {
  if (!t) return "";
  return t.toDate().toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}
