// The web app's `@/lib/db`: one Drizzle client over postgres.js, from DATABASE_URL.
import { drizzle } from "drizzle-orm/postgres-js";
import postgres from "postgres";
import * as schema from "./schema";

const url = process.env.DATABASE_URL;
if (!url) {
  throw new Error("DATABASE_URL is not set");
}

// A name the daemon's audit rows show as the writer of the web app's changes.
export const client = postgres(url, {
  max: 4,
  connection: { application_name: "webapp" },
  onnotice: () => {},
});
export const db = drizzle(client, { schema });
