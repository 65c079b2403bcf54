// Runs the web app's queue functions for a test: one JSON request per stdin line,
// `{"id": 1, "fn": "updateJobStatus", "args": [{...}]}`, one JSON answer per stdout line,
// `{"id": 1, "ok": true, "result": ...}` or `{"id": 1, "ok": false, "error": "...", "code": "..."}`
// (`code`: PostgreSQL's SQLSTATE when the database refused). The functions' own logging goes to
// stderr, so stdout carries answers only.
import * as readline from "readline";
import { client } from "./lib/db";
import * as queue from "./lib/provisioning/queue";

const toStderr = (...args: unknown[]) => process.stderr.write(args.map(String).join(" ") + "\n");
console.log = toStderr;
console.warn = toStderr;

type Fn = (...args: any[]) => Promise<unknown>;
const functions: Record<string, Fn> = {
  enqueueProvisioningJob: queue.enqueueProvisioningJob,
  checkConcurrentProvision: queue.checkConcurrentProvision,
  updateJobStatus: queue.updateJobStatus,
  recordHeartbeat: queue.recordHeartbeat,
  checkJobTimeout: queue.checkJobTimeout,
  getJobByStripeEventId: queue.getJobByStripeEventId,
  getJobByAgentId: queue.getJobByAgentId,
  completeProvisioningWithMetadata: queue.completeProvisioningWithMetadata,
  updateProvisioningStep: queue.updateProvisioningStep,
};

async function main(): Promise<void> {
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (!line.trim()) continue;
    const request = JSON.parse(line) as { id: number; fn: string; args: unknown[] };
    let answer: Record<string, unknown>;
    try {
      const fn = functions[request.fn];
      if (!fn) throw new Error(`unknown function ${request.fn}`);
      const result = await fn(...request.args);
      answer = { id: request.id, ok: true, result: result ?? null };
    } catch (e) {
      const err = e as { message?: string; code?: string; cause?: { message?: string; code?: string } };
      answer = {
        id: request.id,
        ok: false,
        error: err.cause?.message ?? err.message ?? String(e),
        code: err.cause?.code ?? err.code ?? null,
      };
    }
    process.stdout.write(JSON.stringify(answer) + "\n");
  }
  await client.end();
}

main().catch((e) => {
  process.stderr.write(`driver failed: ${e}\n`);
  process.exit(1);
});
