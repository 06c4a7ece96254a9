/**
 * The Falaj contracts for TypeScript: the service descriptors of every platform API,
 * generated from proto/ by protoc-gen-es (see proto/buf.gen.ts.yaml).
 *
 * Messages live beside them under `./gen/falaj/<service>/v1/` (request_response_pb.js,
 * message_pb.js); build them with `create(Schema, init)` from @bufbuild/protobuf. Every
 * call goes to the gateway over mTLS with a client certificate from the platform CA,
 * verifying the server as `localhost` (the name on the platform's server certificates).
 */
export { ExperimentsService } from "./gen/falaj/experiments/v1/service_pb.js";
export { FeaturesService } from "./gen/falaj/features/v1/service_pb.js";
export { GatewayAdminService } from "./gen/falaj/gateway/v1/service_pb.js";
export { GRPCInferenceService } from "./gen/falaj/inference/open_inference_grpc_pb.js";
export { IngestService } from "./gen/falaj/ingest/v1/service_pb.js";
export { MonitoringService } from "./gen/falaj/monitoring/v1/service_pb.js";
export { ServingService } from "./gen/falaj/serving/v1/service_pb.js";
export { TrainingService } from "./gen/falaj/training/v1/service_pb.js";
