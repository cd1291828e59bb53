/**
 * The hangout browser demo: sign up or log in, find and book a host, and
 * chat, on @hangout/client. The page talks to the server that served it
 * (`/ws` beside `/demo`). Each tab keeps its own session (sessionStorage),
 * so two tabs can be two users.
 */
import { HangoutClient, type OwnUser } from "@hangout/client";
import { Account } from "./account.js";
import { Chat } from "./chat.js";
import { Demo } from "./context.js";
import { byId, field, notice, onSubmit, showError } from "./dom.js";
import { Hosts } from "./hosts.js";

const REFRESH_KEY = "hangout.refresh_token";

function socketUrl(): string {
  const url = new URL("ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return url.toString();
}

const client: HangoutClient = new HangoutClient({
  url: socketUrl(),
  // Refresh tokens rotate: each use gives the next one, kept for the next refresh.
  refreshToken: async () => {
    const token = sessionStorage.getItem(REFRESH_KEY);
    if (!token) return null;
    const fresh = await client.auth.refresh({ refresh_token: token });
    sessionStorage.setItem(REFRESH_KEY, fresh.refresh_token);
    return fresh.access_token;
  },
});
const demo = new Demo(client);
const chat = new Chat(demo);
const account = new Account(demo, chat);
new Hosts(demo, account);

function showSignedIn(signedIn: boolean): void {
  byId("signed-out").hidden = signedIn;
  byId("signed-in").hidden = !signedIn;
  byId("logout").hidden = !signedIn;
  byId("me").hidden = !signedIn;
  document.body.dataset.signedIn = String(signedIn);
}

async function enter(user: OwnUser, refreshToken: string): Promise<void> {
  sessionStorage.setItem(REFRESH_KEY, refreshToken);
  showSignedIn(true);
  await account.load(user);
  await chat.loadConversations();
}

onSubmit(byId<HTMLFormElement>("signup"), async (form) => {
  const session = await client.auth.register({
    email: field(form, "email"),
    password: field(form, "password"),
    name: field(form, "name"),
    gender: field(form, "gender"),
  });
  await enter(session.user, session.refresh_token);
});

onSubmit(byId<HTMLFormElement>("login"), async (form) => {
  const session = await client.auth.login({ email: field(form, "email"), password: field(form, "password") });
  await enter(session.user, session.refresh_token);
});

byId("logout").addEventListener("click", () => {
  client.auth.logout({}).catch(showError);
});

client.on("signedOut", () => {
  sessionStorage.removeItem(REFRESH_KEY);
  demo.me = undefined;
  chat.close();
  showSignedIn(false);
});

client.on("state", ({ state }) => {
  const pill = byId("connection");
  pill.textContent = state;
  pill.dataset.state = state;
});

client.on("truncated", () => {
  // Some events were no longer kept while this tab was away: read the state again.
  if (demo.me) void client.users.me({}).then((user) => account.load(user), showError);
});

client.on("error", (error) => console.warn("hangout:", error));

// A reload keeps the tab signed in, through its stored refresh token.
async function restore(): Promise<void> {
  const token = sessionStorage.getItem(REFRESH_KEY);
  if (!token) return;
  try {
    const fresh = await client.auth.refresh({ refresh_token: token });
    const { user } = await client.auth.authenticate({ access_token: fresh.access_token });
    await enter(user, fresh.refresh_token);
  } catch (error) {
    sessionStorage.removeItem(REFRESH_KEY);
    notice("Your session has ended: log in again.");
    console.warn("hangout: restore failed", error);
  }
}

showSignedIn(false);
void restore();
