// The web app's queue module, `src/lib/provisioning/queue.ts`, written from the seeds: seed 003
// (enqueueProvisioningJob, checkConcurrentProvision, updateJobStatus, recordHeartbeat,
// checkJobTimeout, getJobByStripeEventId, getJobByAgentId), seed 000
// (completeProvisioningWithMetadata) and seed 004 (updateProvisioningStep, and the instance's
// currentStep cleared on completion). Each function sends what its seed says, through Drizzle;
// none knows about provisiond.
import { and, desc, eq, inArray, or } from "drizzle-orm";
import { db } from "../db";
import { agentInstances, agents, provisioningJobs } from "../db/schema";

// Heartbeat interval: 60 seconds (GitHub Actions posts heartbeat every 60s)
export const HEARTBEAT_INTERVAL_SECONDS = 60;
// Job timeout: 15 minutes (conservative — VM creation ~2-3min + Ansible ~3-5min + buffer)
export const JOB_TIMEOUT_SECONDS = 900;
// Max retries before requiring support intervention
export const MAX_RETRIES = 3;

export type JobStatus = "queued" | "provisioning" | "running" | "failed";

export async function checkConcurrentProvision(userId: string): Promise<void> {
  const inProgress = await db.query.provisioningJobs.findFirst({
    where: and(
      eq(provisioningJobs.userId, userId),
      or(eq(provisioningJobs.status, "queued"), eq(provisioningJobs.status, "provisioning")),
    ),
  });
  if (inProgress) {
    throw new Error("A provisioning job is already in progress. Please wait for it to complete.");
  }
}

export async function enqueueProvisioningJob(params: {
  agentId: string;
  userId: string;
  stripeEventId: string;
  region?: string;
}): Promise<typeof provisioningJobs.$inferSelect> {
  await checkConcurrentProvision(params.userId);
  const [job] = await db
    .insert(provisioningJobs)
    .values({
      agentId: params.agentId,
      userId: params.userId,
      stripeEventId: params.stripeEventId,
      region: params.region,
      status: "queued",
      retryCount: 0,
    })
    .returning();
  console.log(`[Queue] Enqueued provisioning job ${job.id} for agent ${params.agentId}`);
  return job;
}

export async function updateJobStatus(params: {
  jobId: string;
  status: JobStatus;
  workflowRunId?: string;
  error?: string;
  failedStep?: string;
}): Promise<typeof provisioningJobs.$inferSelect> {
  const now = new Date();
  const updates: Partial<typeof provisioningJobs.$inferInsert> = {
    status: params.status,
    workflowRunId: params.workflowRunId,
    error: params.error,
    failedStep: params.failedStep,
    updatedAt: now,
  };
  if (params.status === "running" || params.status === "failed") {
    updates.completedAt = now;
  }
  if (params.status === "provisioning") {
    updates.claimedAt = now;
  }
  const [updated] = await db
    .update(provisioningJobs)
    .set(updates)
    .where(eq(provisioningJobs.id, params.jobId))
    .returning();
  console.log(`[Queue] Job ${params.jobId} status -> ${params.status}`);
  return updated;
}

export async function recordHeartbeat(jobId: string): Promise<void> {
  await db
    .update(provisioningJobs)
    .set({ lastHeartbeatAt: new Date(), updatedAt: new Date() })
    .where(and(eq(provisioningJobs.id, jobId), eq(provisioningJobs.status, "provisioning")));
}

export async function checkJobTimeout(jobId: string): Promise<boolean> {
  const job = await db.query.provisioningJobs.findFirst({
    where: eq(provisioningJobs.id, jobId),
  });
  if (!job || job.status !== "provisioning") {
    return false;
  }
  const last = job.lastHeartbeatAt ?? job.claimedAt ?? job.updatedAt;
  const elapsed = Math.floor((Date.now() - last.getTime()) / 1000);
  if (elapsed > JOB_TIMEOUT_SECONDS) {
    await db
      .update(provisioningJobs)
      .set({
        status: "failed",
        error: `Timeout: No heartbeat for ${elapsed}s`,
        completedAt: new Date(),
        updatedAt: new Date(),
      })
      .where(eq(provisioningJobs.id, jobId));
    console.log(`[Queue] Job ${jobId} timed out after ${elapsed}s`);
    return true;
  }
  return false;
}

export async function getJobByStripeEventId(
  stripeEventId: string,
): Promise<typeof provisioningJobs.$inferSelect | undefined> {
  return db.query.provisioningJobs.findFirst({
    where: eq(provisioningJobs.stripeEventId, stripeEventId),
  });
}

export async function getJobByAgentId(
  agentId: string,
): Promise<typeof provisioningJobs.$inferSelect | undefined> {
  return db.query.provisioningJobs.findFirst({
    where: eq(provisioningJobs.agentId, agentId),
    orderBy: [desc(provisioningJobs.createdAt)],
  });
}

// seed 000
export interface VMMetadata {
  serverId: string; // Hetzner server ID (as string from callback JSON)
  serverIp: string; // Public IPv4
  tailscaleIp: string; // Tailscale network IP
}

export async function completeProvisioningWithMetadata(params: {
  jobId: string;
  metadata: VMMetadata;
}): Promise<void> {
  const { jobId, metadata } = params;
  const job = await db.query.provisioningJobs.findFirst({
    where: eq(provisioningJobs.id, jobId),
  });
  if (!job) {
    throw new Error(`Job not found: ${jobId}`);
  }
  await updateJobStatus({ jobId, status: "running" });
  const existing = await db.query.agentInstances.findFirst({
    where: and(
      eq(agentInstances.agentId, job.agentId),
      inArray(agentInstances.status, ["pending", "provisioning", "running"]),
    ),
  });
  if (existing) {
    await db
      .update(agentInstances)
      .set({
        status: "running",
        serverId: metadata.serverId,
        serverIp: metadata.serverIp,
        tailscaleIp: metadata.tailscaleIp,
        region: job.region,
        // seed 004: clear the step on completion
        currentStep: null,
        startedAt: new Date(),
        updatedAt: new Date(),
      })
      .where(eq(agentInstances.id, existing.id));
  } else {
    await db.insert(agentInstances).values({
      agentId: job.agentId,
      status: "running",
      serverId: metadata.serverId,
      serverIp: metadata.serverIp,
      tailscaleIp: metadata.tailscaleIp,
      region: job.region,
      startedAt: new Date(),
    });
  }
  console.log(
    `[Queue] Provisioning complete for job ${jobId}: server=${metadata.serverId}, ip=${metadata.serverIp}, tailscale=${metadata.tailscaleIp}`,
  );
  await db
    .update(agents)
    .set({ status: "active", updatedAt: new Date() })
    .where(eq(agents.id, job.agentId));
}

// seed 004: best effort; a missing job or instance is a warning, not an error
export async function updateProvisioningStep(params: {
  jobId: string;
  step: string;
}): Promise<void> {
  const job = await db.query.provisioningJobs.findFirst({
    where: eq(provisioningJobs.id, params.jobId),
  });
  if (!job) {
    console.warn(`[Queue] updateProvisioningStep: job ${params.jobId} not found`);
    return;
  }
  const instance = await db.query.agentInstances.findFirst({
    where: and(
      eq(agentInstances.agentId, job.agentId),
      inArray(agentInstances.status, ["pending", "provisioning"]),
    ),
    orderBy: [desc(agentInstances.createdAt)],
  });
  if (!instance) {
    console.warn(`[Queue] updateProvisioningStep: no instance for agent ${job.agentId}`);
    return;
  }
  await db
    .update(agentInstances)
    .set({ currentStep: params.step, updatedAt: new Date() })
    .where(eq(agentInstances.id, instance.id));
}
