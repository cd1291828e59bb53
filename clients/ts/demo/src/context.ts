/** What the parts of the page share: the client, the signed-in user and
 * other users' names. */
import type { HangoutClient, OwnUser } from "@hangout/client";

export class Demo {
  me: OwnUser | undefined;
  private readonly names = new Map<string, Promise<string>>();

  constructor(readonly client: HangoutClient) {}

  /** Another user's name, looked up once (users.get). */
  name(userId: string): Promise<string> {
    let name = this.names.get(userId);
    if (!name) {
      name = this.client.users.get({ user_id: userId }).then(
        (user) => user.name,
        () => "someone",
      );
      this.names.set(userId, name);
    }
    return name;
  }
}
