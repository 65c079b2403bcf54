// The web app's schema, as the seeds describe it: `provisioningJobs` and `jobStatusEnum` exactly
// as seed 003 lists them; `agentInstances` with the columns seeds 000 and 004 use (its status
// words: pending, provisioning, running, and the "stopped/failed" seed 000 excludes); `agents`
// with a NOT NULL `name` and a `draft` → `active` status (seed 000); `users`. Columns the seeds do
// not name are what a web app like this one has (email, name, description): they are there so
// that the daemon meets NOT NULL columns it must not fill. tests/fixtures/webapp_schema.sql is
// the SQL drizzle-kit generates from this file (see tests/webapp/README.md).
import { relations } from "drizzle-orm";
import { integer, pgEnum, pgTable, text, timestamp, uuid } from "drizzle-orm/pg-core";

export const agentStatusEnum = pgEnum("agent_status", ["draft", "active", "paused", "archived"]);

export const instanceStatusEnum = pgEnum("instance_status", [
  "pending",
  "provisioning",
  "running",
  "stopped",
  "failed",
]);

export const jobStatusEnum = pgEnum("job_status", [
  "queued",
  "provisioning",
  "running",
  "failed",
]);

export const users = pgTable("users", {
  id: uuid("id").defaultRandom().primaryKey(),
  email: text("email").notNull().unique(),
  name: text("name"),
  stripeCustomerId: text("stripe_customer_id"),
  createdAt: timestamp("created_at", { withTimezone: true }).defaultNow().notNull(),
  updatedAt: timestamp("updated_at", { withTimezone: true }).defaultNow().notNull(),
});

export const agents = pgTable("agents", {
  id: uuid("id").defaultRandom().primaryKey(),
  userId: uuid("user_id")
    .references(() => users.id, { onDelete: "cascade" })
    .notNull(),
  name: text("name").notNull(),
  description: text("description"),
  status: agentStatusEnum("status").default("draft").notNull(),
  createdAt: timestamp("created_at", { withTimezone: true }).defaultNow().notNull(),
  updatedAt: timestamp("updated_at", { withTimezone: true }).defaultNow().notNull(),
});

export const agentInstances = pgTable("agent_instances", {
  id: uuid("id").defaultRandom().primaryKey(),
  agentId: uuid("agent_id")
    .references(() => agents.id, { onDelete: "cascade" })
    .notNull(),
  status: instanceStatusEnum("status").default("pending").notNull(),
  serverId: text("server_id"),
  serverIp: text("server_ip"),
  tailscaleIp: text("tailscale_ip"),
  region: text("region"),
  // seed 004 (drizzle/0004_fearless_the_liberteens.sql)
  currentStep: text("current_step"),
  startedAt: timestamp("started_at", { withTimezone: true }),
  stoppedAt: timestamp("stopped_at", { withTimezone: true }),
  createdAt: timestamp("created_at", { withTimezone: true }).defaultNow().notNull(),
  updatedAt: timestamp("updated_at", { withTimezone: true }).defaultNow().notNull(),
});

// seed 003, Task 1
export const provisioningJobs = pgTable("provisioning_jobs", {
  id: uuid("id").defaultRandom().primaryKey(),
  agentId: uuid("agent_id")
    .references(() => agents.id, { onDelete: "cascade" })
    .notNull(),
  userId: uuid("user_id")
    .references(() => users.id, { onDelete: "cascade" })
    .notNull(),
  stripeEventId: text("stripe_event_id").unique(),
  status: jobStatusEnum("status").notNull().default("queued"),
  region: text("region").notNull().default("us-east"),
  workflowRunId: text("workflow_run_id"),
  retryCount: integer("retry_count").notNull().default(0),
  maxRetries: integer("max_retries").notNull().default(3),
  error: text("error"),
  failedStep: text("failed_step"),
  claimedAt: timestamp("claimed_at", { withTimezone: true }),
  lastHeartbeatAt: timestamp("last_heartbeat_at", { withTimezone: true }),
  completedAt: timestamp("completed_at", { withTimezone: true }),
  createdAt: timestamp("created_at", { withTimezone: true }).defaultNow().notNull(),
  updatedAt: timestamp("updated_at", { withTimezone: true }).defaultNow().notNull(),
});

export const usersRelations = relations(users, ({ many }) => ({
  agents: many(agents),
  provisioningJobs: many(provisioningJobs),
}));

export const agentsRelations = relations(agents, ({ one, many }) => ({
  user: one(users, { fields: [agents.userId], references: [users.id] }),
  instances: many(agentInstances),
  provisioningJobs: many(provisioningJobs),
}));

export const agentInstancesRelations = relations(agentInstances, ({ one }) => ({
  agent: one(agents, { fields: [agentInstances.agentId], references: [agents.id] }),
}));

export const provisioningJobsRelations = relations(provisioningJobs, ({ one }) => ({
  agent: one(agents, { fields: [provisioningJobs.agentId], references: [agents.id] }),
  user: one(users, { fields: [provisioningJobs.userId], references: [users.id] }),
}));
